"""The checks of a training's flags that need no data: every one fails before anything is loaded or tracked."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from plantml.errors import UsageError, one_line, os_reason
from plantml.tracking.validation import check_registered_model_name, run_name
from plantml.training.config import DEFAULT_IMAGE_SIZE, TrainConfig
from plantml.training.data import check_split_fractions
from plantml.training.models import SMALLEST_FEATURE_MAP_PX, get_backbone


def check_config(config: TrainConfig) -> torch.device:
    """Reject impossible flag combinations; return the device to train on."""
    get_backbone(config.backbone)
    run_name(config.run_name)  # a NUL or a name too long for MLflow's database: before any data is read
    if config.registered_model_name is not None:  # refused by the registry only after the whole training, otherwise
        check_registered_model_name(config.registered_model_name, "--registered-model-name")
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be at least 1")
    for name in ("learning_rate", "weight_decay"):
        if not math.isfinite(getattr(config, name)):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be a finite number")
    if not config.learning_rate > 0:
        raise UsageError(f"--learning-rate {config.learning_rate}: must be positive")
    if config.weight_decay < 0:
        raise UsageError(f"--weight-decay {config.weight_decay}: must be 0 or more")
    if config.early_stopping_patience < 1:
        raise UsageError(f"--early-stopping-patience {config.early_stopping_patience}: must be at least 1")
    if config.unfreeze_epoch is not None:
        if not config.freeze_backbone:
            raise UsageError("--unfreeze-epoch needs --freeze-backbone")
        if not 1 <= config.unfreeze_epoch <= config.epochs:
            raise UsageError(f"--unfreeze-epoch {config.unfreeze_epoch}: must be between 1 and --epochs ({config.epochs})")
    if config.image_size is not None and not 16 <= config.image_size <= 1024:
        raise UsageError(f"--image-size {config.image_size}: choose between 16 and 1024 pixels")
    check_split_fractions(config.val_split, config.test_split)  # before a scan that decodes every image
    if config.data_dir is not None and not str(config.data_dir).strip():  # "$UNSET" would train on the current folder
        raise UsageError("--data-dir is empty: give a folder or s3://BUCKET/PREFIX, or leave it out for the synthetic set")
    if config.num_workers is not None and config.num_workers < 0:
        raise UsageError(f"--num-workers {config.num_workers}: must be 0 or more")
    if config.device not in (None, "cpu", "cuda"):
        raise UsageError(f"--device {config.device}: choose cuda or cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu)")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    image_size = config.image_size or DEFAULT_IMAGE_SIZE[device.type]
    if config.batch_size == 1 and image_size <= SMALLEST_FEATURE_MAP_PX:
        raise UsageError(f"--batch-size 1 at --image-size {image_size}: the backbone's last feature map is 1x1 there, "
                         "and batch norm cannot train on one value per channel; use --batch-size 2 or more, "
                         f"or --image-size {SMALLEST_FEATURE_MAP_PX + 1} or more")
    if config.compile:
        check_compiler()
    return device


def check_compiler() -> None:
    """``--compile`` needs a working C++ compiler (torch's inductor builds its kernels with one, on the CPU and for
    triton's launchers on CUDA): a slim container has none, and torch failed at the first batch, with a traceback."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch: its own error comes at the first batch
        return
    try:
        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - InvalidCxxCompiler, whatever module torch keeps it in
        raise UsageError(f"--compile: {one_line(exc)}; install one (g++), set CXX to it, or train without --compile") from None


def check_output_dir(folder: Path) -> None:
    """Make ``--output-dir`` and prove a file can be written there, so a bad one fails before the training, not after."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"--output-dir {folder}: cannot write there ({os_reason(exc)})") from None


def data_on_device(config: TrainConfig, device: torch.device) -> bool:
    """Whether batches are built on the GPU (see :mod:`plantml.training.device_data`): by default
    on CUDA, with the set decoded once when it fits in device memory, else decoded per batch."""
    if config.data_on_device is None:
        return device.type == "cuda"
    if config.data_on_device and device.type != "cuda":
        raise UsageError("--data-on-device needs --device cuda")
    return config.data_on_device


#: The CPU instructions that make bf16 arithmetic native; without them torch emulates it.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def emulated_bf16_note(device: torch.device, autocast_dtype: torch.dtype | None) -> str | None:
    """A warning for ``--amp`` on a CPU without bf16 instructions, where autocast emulates it: resnet18's training
    steps took 26 times as long as in float32 here (``benchmarks/cpu_amp.py``). None elsewhere, or where
    ``/proc/cpuinfo`` does not say."""
    if device.type != "cpu" or autocast_dtype != torch.bfloat16:
        return None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = {flag for line in info if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return None
    if not flags or flags & _BF16_FLAGS:
        return None
    return ("--amp on this CPU: it has no bf16 instructions (avx512_bf16, amx_bf16), so bf16 is emulated, many times "
            "slower than float32 (resnet18's training steps: 26 times, measured); train without --amp on the CPU")

