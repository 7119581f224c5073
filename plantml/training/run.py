"""One training run, end to end: :func:`prepare` checks and loads, :func:`fit` trains and records.

Everything that can be wrong with the inputs (flags, data folder, weights) fails in
:func:`prepare`, before any tracking run exists. :func:`fit` receives the tracker as a
collaborator (an :class:`plantml.tracking.MLflowTracker`, or :class:`NullTracker` for
``--no-mlflow``, which imports nothing from mlflow) and a :class:`Reporter` for progress;
it never prints.

Under torchrun every rank runs :func:`prepare` and :func:`fit` on its share of the data
(see :mod:`plantml.training.distributed`); only rank 0 is given a real tracker, and only
it writes files.
"""

from __future__ import annotations

import logging
import random
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from plantml.datasets.source import DatasetRecord, DataSource, locate
from plantml.errors import RankFailed, UsageError
from plantml.text import shown_text
from plantml.tracking import signals as tracking_signals
from plantml.training import data as data_mod
from plantml.training import distributed, outputs, synth
from plantml.training.checks import check_config, check_output_dir, data_on_device, emulated_bf16_note
from plantml.training.config import DEFAULT_IMAGE_SIZE, NullTracker, Reporter, TrainConfig, TrainResult
from plantml.training.device_data import build_device_loaders, fits_on_device
from plantml.training.distributed import Ranks
from plantml.training.failures import raise_as_resource_failure
from plantml.training.loop import EarlyStopping, Precision, choose_precision, evaluate, train_one_epoch
from plantml.training.models import (
    SMALLEST_FEATURE_MAP_PX,
    WeightsChoice,
    build_model,
    count_parameters,
    resolve_weights,
    set_backbone_frozen,
)
from plantml.training.sharding import set_epoch

logger = logging.getLogger(__name__)

OPTIMIZER = "AdamW"
SCHEDULER = "CosineAnnealingLR"
LOSS_FUNCTION = "CrossEntropyLoss"


@dataclass
class Prepared:
    """A checked configuration with its data and model, ready for :func:`fit`."""

    config: TrainConfig
    device: torch.device
    precision: Precision
    image_size: int
    num_workers: int
    source: DataSource
    scan: data_mod.ImageFolderScan
    loaders: data_mod.DataLoaders
    model: nn.Module
    weights: WeightsChoice
    synthetic: bool
    total_parameters: int
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)
    ranks: Ranks = field(default_factory=Ranks)

    @property
    def num_classes(self) -> int:
        """Number of classes of the data set."""
        return len(self.scan.classes)

    @property
    def registered_model_name(self) -> str | None:
        """The registry name the best model goes to, or None when not registering."""
        if not self.config.register:
            return None
        return self.config.registered_model_name or f"{self.config.backbone}_plant_classifier"

    def params(self) -> dict[str, Any]:
        """The run's params: the design's list (with weight_decay and the split fractions), then seed, weights,
        image_size, skipped_images and the processes.

        ``batch_size`` is per process (``--batch-size``); ``global_batch_size`` is what one
        optimizer step sees, ``batch_size * world_size``.
        """
        c = self.config
        return {
            "backbone": c.backbone,
            "epochs": c.epochs,
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "weight_decay": c.weight_decay,
            "device": self.device.type,
            "freeze_backbone": c.freeze_backbone,
            "unfreeze_epoch": c.unfreeze_epoch,
            "early_stopping_patience": c.early_stopping_patience,
            "optimizer": OPTIMIZER,
            "scheduler": SCHEDULER,
            "loss_function": LOSS_FUNCTION,
            "num_classes": self.num_classes,
            "val_split": c.val_split,
            "test_split": c.test_split,
            **self.loaders.split.sizes(),
            "total_parameters": self.total_parameters,
            "trainable_parameters": self.trainable_parameters,
            "seed": c.seed,
            "weights": self.weights.label,
            "image_size": self.image_size,
            "world_size": self.ranks.world_size,
            "global_batch_size": c.batch_size * self.ranks.world_size,
            "skipped_images": len(self.scan.skipped),
        }

    def dataset_record(self) -> DatasetRecord:
        """The run's dataset input: the set's name, content digest, where it came from, split sizes."""
        return DatasetRecord(name=self.source.name, digest=self.scan.content_hash, source=self.source.uri,
                             source_type=self.source.kind, splits=self.loaders.split.sizes(), classes=self.scan.classes)

    def tags(self) -> dict[str, str]:
        """Tags set when the run starts: framework, data set and its hash, code version."""
        tags = {
            "framework": "pytorch",
            "model": self.config.backbone,
            "dataset": self.source.name,
            "dataset_hash": self.scan.content_hash,
            "dataset_path": str(self.scan.root.resolve()),  # `--data-dir ../leaves` means nothing away from its folder
            "dataset_source": self.source.uri,
            "dataset_synthetic": str(self.synthetic).lower(),
            "dataset_classes": ",".join(self.scan.classes),
            "dataset_skipped_images": str(len(self.scan.skipped)),
            "amp": str(self.precision.autocast_dtype).replace("torch.", "") if self.precision.autocast_dtype else "off",
            "channels_last": str(self.precision.channels_last).lower(),
            "num_workers": str(self.num_workers),
            "data_on_device": str(bool(self.loaders.extra.get("data_on_device"))).lower(),
            "data_streamed": str(bool(self.loaders.extra.get("streamed"))).lower(),
            "compile": str(self.config.compile).lower(),
            "distributed_backend": self.ranks.backend or "none",
        }
        if self.device.type == "cuda":
            tags["device_name"] = torch.cuda.get_device_name(self.device)
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
            changed = _git(["status", "--porcelain", "--untracked-files=no"])
            if changed is not None:  # the commit alone does not say which code trained: tracked files changed since?
                tags["git_dirty"] = str(bool(changed)).lower()
        return tags


def git_commit(cwd: Path | None = None) -> str | None:
    """The current git commit of ``cwd``, or None outside a repository."""
    return _git(["rev-parse", "HEAD"], cwd)


def _git(args: list[str], cwd: Path | None = None) -> str | None:
    """``git ARGS``' output in ``cwd``, stripped; None when git fails or is not there."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(config: TrainConfig, ranks: Ranks = Ranks(), reporter: Reporter = Reporter()) -> Prepared:
    """Check every input, load the data set and build the model; no tracking happens here.

    With the ``ranks`` of a distributed training (:func:`plantml.training.distributed.session`),
    the loaders give this rank its share and CUDA means this rank's GPU. ``reporter`` sees the data folder's scan.
    """
    device = check_config(config)
    if config.output_dir is not None and ranks.is_main:  # rank 0 alone keeps the outputs
        check_output_dir(Path(config.output_dir).expanduser())
    if device.type == "cuda" and ranks.distributed:
        device = ranks.device
    weights = resolve_weights(config.backbone, config.weights)
    # under torchrun, one rank per machine makes or pulls the set into the cache, then the others read it
    source = ranks.local_main_first(lambda: locate(config.data_dir, lambda: synth.ensure_cached(config.synthetic)))
    synthetic = source.kind == "synthetic" or synth.is_synthetic(source.folder)
    # the images unchanged since the last training are not read again
    scan = data_mod.scan_image_folder(source.folder, skip_bad_images=config.skip_bad_images, name_of=source.origin_of,
                                     record="use", progress=reporter.images)
    source.check_digest(scan.content_hash, len(scan.skipped))
    split = data_mod.stratified_split([label for _, label in scan.samples], config.val_split, config.test_split,
                                      seed=config.seed, class_names=scan.classes)
    for name, indices in (("train", split.train), ("val", split.val)):
        if len(indices) < 1:
            raise UsageError(f"the {name} split is empty")

    image_size = config.image_size or DEFAULT_IMAGE_SIZE[device.type]
    if -(-len(split.train) // ranks.world_size) == 1 and image_size <= SMALLEST_FEATURE_MAP_PX:
        raise UsageError(f"{len(split.train)} training images give each of {ranks.world_size} processes one image a step, "
                         f"and batch norm cannot train on one image at --image-size {image_size}: use fewer processes, "
                         f"more images, or --image-size {SMALLEST_FEATURE_MAP_PX + 1} or more")
    num_workers = data_mod.default_num_workers() if config.num_workers is None else config.num_workers
    precision = choose_precision(device, config.amp, config.channels_last)
    on_device = data_on_device(config, device)
    if on_device:
        loaders = build_device_loaders(scan, split, image_size=image_size, batch_size=config.batch_size,
                                       device=device, seed=config.seed, channels_last=precision.channels_last,
                                       ranks=ranks, streamed=not fits_on_device(len(scan.samples), image_size, device))
    else:
        loaders = data_mod.build_loaders(scan, split, image_size=image_size, batch_size=config.batch_size,
                                         num_workers=num_workers, seed=config.seed, pin_memory=device.type == "cuda",
                                         ranks=ranks)

    seed_everything(config.seed)  # the same initial model on every rank
    model = build_model(config.backbone, len(scan.classes), weights)
    if config.freeze_backbone:
        set_backbone_frozen(model, config.backbone, frozen=True)
    total, trainable = count_parameters(model)
    if ranks.distributed:
        seed_everything(config.seed + ranks.rank)  # but each rank its own augmentation draws

    notes = [note for note in (weights.note, emulated_bf16_note(device, precision.autocast_dtype)) if note]
    if scan.skipped:
        notes.append(f"{len(scan.skipped)} unreadable image(s) skipped (such as {shown_text(source.origin_of(scan.skipped[0]))})")
    return Prepared(
        config=config, device=device, precision=precision, source=source,
        image_size=image_size, num_workers=num_workers, scan=scan, loaders=loaders, model=model,
        weights=weights, synthetic=synthetic, total_parameters=total, trainable_parameters=trainable, notes=notes,
        ranks=ranks,
    )


def default_run_name(backbone: str) -> str:
    """``{backbone}_{YYYYmmdd-HHMMSS}``."""
    return f"{backbone}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def fit(prepared: Prepared, tracker: Any = None, reporter: Reporter | None = None) -> TrainResult:
    """Train, evaluate the best model on the test split and record it all through ``tracker``.

    The tracking run always ends: FINISHED, FAILED on an error, KILLED on Ctrl-C (which
    is then re-raised). In a distributed training, a run stopped because another rank
    failed first ends FAILED, and :class:`plantml.errors.RankFailed` names that rank.
    """
    tracker = tracker if tracker is not None else NullTracker()
    reporter = reporter or Reporter()
    ranks = prepared.ranks
    for note in prepared.notes if ranks.is_main else ():
        logger.warning(note)
    config = prepared.config
    start = tracker.start_run(run_name=config.run_name or default_run_name(config.backbone), tags=prepared.tags())
    run_id = getattr(tracker, "run_id", None) or getattr(getattr(start, "info", None), "run_id", None)
    try:
        tracker.log_params(prepared.params())
        record = prepared.dataset_record()
        tracker.log_input(record.name, record.digest, record.source_json(), record.source_type, profile=record.profile())
        tracker.log_system_metrics()
        result = _train_and_record(prepared, tracker, reporter)
    except BaseException as exc:  # Ctrl-C, a handled SIGTERM/SIGHUP, an error here or on another rank
        cause: BaseException = exc
        try:
            with tracking_signals.deferred():  # a stop signal arriving now must not cut the end of the run short
                cause = distributed.why_stopped(ranks, exc, tracking_signals.received())
                if isinstance(cause, RankFailed):
                    known = {"failed_rank": str(cause.rank)} if cause.rank >= 0 else {}
                    _quietly(tracker.set_tags, {**known, "failure": str(cause)[:1000]})
                _quietly(tracker.end_run, status="KILLED" if isinstance(cause, KeyboardInterrupt) else "FAILED", error=cause)
        except KeyboardInterrupt:  # the stop came while the run was being ended (it was raised on leaving)
            if not isinstance(cause, RankFailed):
                raise
            # torchrun's SIGTERM, sent because another rank failed: that failure is the news
        if cause is exc:
            raise_as_resource_failure(exc, prepared)  # after the run ended FAILED with torch's own error
            raise
        raise cause from exc
    tracker.end_run(status="FINISHED")
    result.run_id = run_id
    return result


def _quietly(call: Any, *args: Any, **kwargs: Any) -> None:
    # the original exception matters more than a failure to report it: one line, no traceback
    try:
        call(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not record the end of the tracking run (%s): %s", getattr(call, "__name__", call), exc)


def _train_and_record(prepared: Prepared, tracker: Any, reporter: Reporter) -> TrainResult:
    config, device, precision, ranks = prepared.config, prepared.device, prepared.precision, prepared.ranks
    model = prepared.model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)

    def step_model() -> nn.Module:
        # DDP under torchrun; the compiled module shares the model's parameters; checkpoints come from the plain one
        wrapped = ranks.wrap(model)
        return torch.compile(wrapped) if config.compile else wrapped

    train_model = step_model()
    # evaluation runs each rank's share with no collective per batch, so on the plain model, never DDP's
    eval_model = train_model if not ranks.distributed else (torch.compile(model) if config.compile else model)
    criterion = nn.CrossEntropyLoss()
    # every parameter is in the optimizer from the start; frozen ones have no grad, so AdamW skips them
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    scaler = torch.amp.GradScaler("cuda") if precision.autocast_dtype == torch.float16 and device.type == "cuda" else None
    stopper = EarlyStopping(config.early_stopping_patience)
    loaders = prepared.loaders

    history: dict[str, Any] = {k: [] for k in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")}
    best_state = None
    best_val_accuracy = float("nan")
    stopped_early = False
    trained_images, train_seconds = 0, 0.0
    for epoch in range(1, config.epochs + 1):
        distributed.fail_if_asked(ranks, epoch)
        if config.freeze_backbone and config.unfreeze_epoch == epoch:
            set_backbone_frozen(model, config.backbone, frozen=False)
            if ranks.distributed:
                train_model = step_model()  # DDP syncs only what required a gradient when it was built
            reporter.message(f"epoch {epoch}: backbone unfrozen")
        set_epoch(loaders.train, epoch)
        learning_rate = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        wrap = lambda batches, e=epoch: reporter.batches(batches, epoch=e, epochs=config.epochs, total=len(loaders.train))  # noqa: E731
        train = train_one_epoch(train_model, loaders.train, criterion, optimizer, device, precision, scaler, wrap,
                                sum_across=ranks.sum_across)
        train_time = time.perf_counter() - started
        ranks.broadcast_buffers(model)
        val, _ = evaluate(eval_model, loaders.val, criterion, device, precision, sum_across=ranks.sum_across)
        scheduler.step()
        seconds = time.perf_counter() - started
        trained_images += train.samples
        train_seconds += train_time

        record = {"epoch": epoch, "train_loss": train.loss, "train_accuracy": train.accuracy, "val_loss": val.loss,
                  "val_accuracy": val.accuracy, "learning_rate": learning_rate, "seconds": seconds}
        for key, value in record.items():
            history[key].append(value)
        tracker.log_training_metrics(epoch=epoch, train_loss=train.loss, train_acc=train.accuracy,
                                     val_loss=val.loss, val_acc=val.accuracy, learning_rate=learning_rate)
        reporter.epoch_end({**record, "epochs": config.epochs})

        # val.loss is the same number on every rank (all-reduced): so are these decisions
        if stopper.step(epoch, val.loss) or best_state is None:
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best_val_accuracy = val.accuracy
            best_epoch = epoch
        if stopper.should_stop and epoch < config.epochs:
            stopped_early = True
            reporter.message(f"early stopping after epoch {epoch}: no val_loss improvement for {stopper.patience} epoch(s)")
            break

    model.load_state_dict(best_state)
    test, matrix = evaluate(model, loaders.test, criterion, device, precision, num_classes=prepared.num_classes,
                            sum_across=ranks.sum_across)
    best_val_loss = history["val_loss"][best_epoch - 1]
    # the run's latest val_loss and val_accuracy are the last epoch's; these are the kept model's, the one registered
    tracker.log_metrics({"test_loss": test.loss, "test_accuracy": test.accuracy,
                         "best_val_loss": best_val_loss, "best_val_accuracy": best_val_accuracy})
    history.update({
        "best_epoch": best_epoch, "best_val_loss": best_val_loss, "best_val_accuracy": best_val_accuracy,
        "stopped_early": stopped_early, "test_loss": test.loss, "test_accuracy": test.accuracy,
        "classes": list(prepared.scan.classes), "confusion_matrix": matrix,
    })
    result = TrainResult(history=history, best_epoch=best_epoch, best_val_loss=best_val_loss,
                         best_val_accuracy=best_val_accuracy, test=test, confusion_matrix=matrix,
                         stopped_early=stopped_early,
                         images_per_second=trained_images / train_seconds if train_seconds else 0.0)
    if ranks.is_main:  # the other ranks write no files
        outputs.save_and_log(prepared, model, best_state, result, tracker, reporter)
    return result


def train(config: TrainConfig, tracker: Any = None, reporter: Reporter | None = None) -> TrainResult:
    """:func:`prepare` then :func:`fit`: the whole run in one call."""
    reporter = reporter or Reporter()
    return fit(prepare(config, reporter=reporter), tracker, reporter)

