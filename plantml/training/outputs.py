"""What a finished training leaves: the checkpoint and history on disk, and in MLflow the
artifacts, the figures, the closing tags and the registered model.

Called by :func:`plantml.training.run.fit` once the test split is evaluated; under torchrun,
on rank 0 only.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from plantml.staging import folder_lock, local_writes, scratch_folder
from plantml.text import safe_data
from plantml.training import figures
from plantml.training.data import preprocessing
from plantml.training.models import image_batch_signature

if TYPE_CHECKING:
    from plantml.training.config import Reporter, TrainResult
    from plantml.training.run import Prepared


def save_and_log(prepared: Prepared, model: nn.Module, best_state: dict, result: TrainResult,
                 tracker: Any, reporter: Reporter) -> None:
    """Write the checkpoint and history; log them, the figures, tags and the registered model."""
    config = prepared.config
    keep = config.output_dir is not None
    role = "--output-dir" if keep else "temporary folder"
    with contextlib.ExitStack() as scope:
        if keep:
            out_dir = Path(config.output_dir).expanduser()
            with local_writes(role, out_dir):
                out_dir.mkdir(parents=True, exist_ok=True)
        else:  # named after this process: the next training sweeps it away if a kill -9 left it
            out_dir = scope.enter_context(scratch_folder("plantml-train"))
        checkpoint = out_dir / "best_model.pth"
        serialized = io.BytesIO()  # torch's own writer reports a full disk as a RuntimeError about zip offsets
        torch.save({
            "model_state_dict": best_state, "backbone": config.backbone, "num_classes": prepared.num_classes,
            "classes": list(prepared.scan.classes), "image_size": prepared.image_size,
            "epoch": result.best_epoch, "val_loss": result.best_val_loss, "val_accuracy": result.best_val_accuracy,
        }, serialized)
        # two trainings given one --output-dir (a sweep): the last to end leaves its own pair of files, and each
        # run logs its own checkpoint (copied into its journal's spool before the lock goes), never the other's
        with contextlib.ExitStack() as held:
            if keep:
                with contextlib.suppress(OSError):  # a folder that cannot be locked (some network file systems)
                    held.enter_context(folder_lock(out_dir))
            write_whole(checkpoint, serialized.getvalue(), role)
            write_whole(out_dir / "training_history.json", json.dumps(safe_data(result.history), indent=2).encode(), role)
            tracker.log_dict(result.history, "training/training_history.json")
            tracker.log_artifact(checkpoint, artifact_path="models")
        result.checkpoint = checkpoint if keep else None

        tracker.log_figure(figures.learning_curves(result.history), "figures/learning_curves.png")
        tracker.log_figure(figures.confusion_matrix(result.confusion_matrix, prepared.scan.classes), "figures/confusion_matrix.png")
        tracker.set_tags({
            "best_val_accuracy": f"{result.best_val_accuracy:.4f}",
            "best_epoch": str(result.best_epoch),
            "stopped_early": str(result.stopped_early).lower(),
        })
        if getattr(tracker, "enabled", True):
            result.model_version = log_model(prepared, model, tracker)
            if result.model_version:
                reporter.message(f"registered {prepared.registered_model_name} version {result.model_version}")


def write_whole(path: Path, data: bytes, role: str) -> None:
    """Write ``path`` whole or not at all: a full or read-only disk is one line naming the folder as ``role``,
    and neither leaves a truncated file nor touches the one already there."""
    partial = path.with_name(f".{path.name}.partial")
    with local_writes(role, path.parent):
        try:
            partial.write_bytes(data)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def log_model(prepared: Prepared, model: nn.Module, tracker: Any) -> str | None:
    """Log the best model (PyTorch flavor, signature, a two-image input example, its classes and preprocessing) and register it."""
    export = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    # two images as the input example shown in the UI and used by `mlflow models serve` checks
    example = torch.stack([prepared.loaders.test.dataset[i][0] for i in range(min(2, len(prepared.loaders.test.dataset)))])
    example_np = example.numpy()
    signature = image_batch_signature(prepared.num_classes)  # any batch size, any image size
    # the class names and the preprocessing travel with the model: its MLmodel's metadata, readable without the run
    metadata = preprocessing(prepared.scan.classes, prepared.image_size)
    info = tracker.log_model(export, artifact_path="model", registered_model_name=prepared.registered_model_name,
                             input_example=example_np, signature=signature, metadata=metadata)
    version = getattr(info, "registered_model_version", None)
    if version is not None:
        tracker.set_tags({"registered_model_name": prepared.registered_model_name, "registered_model_version": str(version)})
    return None if version is None else str(version)
