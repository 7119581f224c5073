"""The training loop as plain functions, in the manner of torchvision's reference scripts.

Loss and accuracy are summed on the device and read once per epoch: no ``.item()``
per batch, so the GPU never waits on the host inside an epoch. Under torchrun each
process loops over its share of the data, and ``sum_across`` (see
:mod:`plantml.training.distributed`) adds the processes' sums before they are read, so
every process reports the same numbers over the whole split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EpochStats:
    """Mean loss and accuracy over one pass of a loader."""

    loss: float
    accuracy: float
    samples: int


@dataclass(frozen=True)
class Precision:
    """How batches run on the device: autocast dtype (None = full precision), memory format."""

    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self, device: torch.device):
        """An autocast context for ``device``, or a no-op one."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def to_device(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Move a batch, in channels-last layout when asked."""
        images = images.to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def choose_precision(device: torch.device, amp: bool | None, channels_last: bool | None) -> Precision:
    """Defaults: bf16 autocast and channels-last on CUDA (fp16 where bf16 is missing), neither on CPU."""
    on_cuda = device.type == "cuda"
    use_amp = on_cuda if amp is None else amp
    dtype = None
    if use_amp:
        dtype = torch.bfloat16 if (not on_cuda or torch.cuda.is_bf16_supported()) else torch.float16
    return Precision(autocast_dtype=dtype, channels_last=on_cuda if channels_last is None else channels_last)


BatchWrapper = Callable[[Iterable], Iterable]
#: Sums a tensor over every process of a distributed training (identity on a single process).
SumAcross = Callable[[torch.Tensor], torch.Tensor]


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device, precision: Precision = Precision(),
                    scaler: torch.amp.GradScaler | None = None, wrap: BatchWrapper | None = None,
                    sum_across: SumAcross | None = None) -> EpochStats:
    """One pass over ``loader`` with gradient steps; ``wrap`` may decorate the batches (a progress bar)."""
    model.train()
    keep_frozen_norms_still(model)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for images, targets in (wrap(loader) if wrap else loader):
        images = precision.to_device(images, device)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach().double() * targets.size(0)
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        seen += targets.size(0)
    return _stats(loss_sum, correct, seen, sum_across)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def keep_frozen_norms_still(model: nn.Module) -> None:
    """Put every batch-norm layer whose weights do not train in eval mode.

    In train mode a batch-norm layer moves its running mean and variance towards each
    batch even when its weights are frozen: a "frozen" backbone would still change, and
    the model kept would not be the pretrained backbone under a trained head. A layer
    without weights (``affine=False``) is left as it is.
    """
    for module in model.modules():
        weights = list(module.parameters(recurse=False)) if isinstance(module, _BATCH_NORMS) else []
        if weights and not any(weight.requires_grad for weight in weights):
            module.eval()


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, criterion: nn.Module, device: torch.device,
             precision: Precision = Precision(), num_classes: int | None = None,
             sum_across: SumAcross | None = None) -> tuple[EpochStats, list[list[int]] | None]:
    """Loss and accuracy over ``loader``; with ``num_classes``, also the confusion matrix (rows: truth)."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64) if num_classes else None
    seen = 0
    for images, targets in loader:
        images = precision.to_device(images, device)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        predictions = logits.argmax(dim=1)
        loss_sum += loss.double() * targets.size(0)
        correct += (predictions == targets).sum()
        if confusion is not None:
            confusion += torch.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
        seen += targets.size(0)
    if confusion is not None and sum_across is not None:
        confusion = sum_across(confusion)
    matrix = confusion.view(num_classes, num_classes).tolist() if confusion is not None else None
    return _stats(loss_sum, correct, seen, sum_across), matrix


def _stats(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, sum_across: SumAcross | None = None) -> EpochStats:
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device)])
    if sum_across is not None:  # every process calls it, even one whose share was empty
        totals = sum_across(totals)
    # the one host synchronisation of the epoch
    loss_total, correct_total, seen_total = totals.tolist()
    if seen_total == 0:
        return EpochStats(loss=float("nan"), accuracy=float("nan"), samples=0)
    return EpochStats(loss=loss_total / seen_total, accuracy=correct_total / seen_total, samples=int(seen_total))


class EarlyStopping:
    """Stop when the validation loss has not improved for ``patience`` epochs.

    ``step`` returns True when the epoch is the new best (its weights should be kept).
    """

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = float("inf")
        self.best_epoch = 0
        self.bad_epochs = 0

    def step(self, epoch: int, val_loss: float) -> bool:
        """Record ``val_loss`` for ``epoch``; True when it is the best so far."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` epochs in a row brought no improvement."""
        return self.bad_epochs >= self.patience
