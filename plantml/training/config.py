"""A training run's inputs and outputs as types: what :func:`plantml.training.run.fit` is given and returns.

:class:`TrainConfig` holds every choice (the command line maps its flags one to one onto
it), :class:`TrainResult` what a finished run produced; :class:`Reporter` is where progress
goes and :class:`NullTracker` the tracker of ``--no-mlflow``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plantml.training import synth
from plantml.training.loop import EpochStats

#: The image side when ``--image-size`` is not given, by device type.
DEFAULT_IMAGE_SIZE = {"cuda": 224, "cpu": 64}


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of a training run; the command line maps its flags one to one onto these."""

    backbone: str = "resnet18"
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    device: str | None = None  # None: CUDA when present, else CPU
    freeze_backbone: bool = False
    unfreeze_epoch: int | None = None  # 1-based epoch at which the backbone starts training
    early_stopping_patience: int = 10
    data_dir: str | Path | None = None  # a folder, s3://BUCKET/PREFIX, or None: the cached synthetic set
    synthetic: synth.SynthSpec = field(default_factory=synth.SynthSpec)
    skip_bad_images: bool = False
    val_split: float = 0.15
    test_split: float = 0.15
    weights: str = "auto"
    image_size: int | None = None  # None: 224 on CUDA, 64 on CPU
    seed: int = 42
    num_workers: int | None = None  # None: sized to the machine
    amp: bool | None = None  # None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    data_on_device: bool | None = None  # None: on for CUDA (decoded once when the set fits in a quarter of free memory, else per batch)
    compile: bool = False  # torch.compile the model for training and evaluation
    run_name: str | None = None
    register: bool = True
    registered_model_name: str | None = None  # None: {backbone}_plant_classifier
    output_dir: Path | None = None  # where best_model.pth and the history are kept; None: a temp folder


class NullTracker:
    """The tracker of ``--no-mlflow``: every call is accepted and does nothing."""

    enabled = False
    run_id = None

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class Reporter:
    """Where :func:`fit` reports progress; this base reports nothing."""

    def images(self, iterable: Iterable, *, total: int) -> Iterable:
        """Wrap the images the data folder's scan reads or finds unchanged, before the run (a progress bar may draw here)."""
        return iterable

    def batches(self, iterable: Iterable, *, epoch: int, epochs: int, total: int) -> Iterable:
        """Wrap the training batches of one epoch (a progress bar may draw here)."""
        return iterable

    def epoch_end(self, record: dict[str, float]) -> None:
        """Called after each epoch with its metrics."""

    def message(self, text: str) -> None:
        """A line worth telling the user (a fallback taken, a model registered)."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    history: dict[str, Any]
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    test: EpochStats
    confusion_matrix: list[list[int]]
    stopped_early: bool
    run_id: str | None = None
    model_version: str | None = None
    checkpoint: Path | None = None
    images_per_second: float = 0.0

