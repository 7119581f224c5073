"""``plantml train``: the design's training script as a command.

Flags map one to one onto :class:`plantml.training.config.TrainConfig`. Inputs are checked
(and the data set loaded) before a tracker is created, so a bad flag or folder never
leaves a run behind. torch and mlflow are imported only once the command runs, and after
the checks that need neither (a missing folder, a mistyped URI: said in a second, not nine).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import click

from plantml.cli.bars import iteration_bar, scan_bar
from plantml.cli.params import NON_BLANK
from plantml.cli.warnings_output import show_warnings
from plantml.text import mask_passwords

BACKBONE_NAMES = ("resnet18", "resnet50", "efficientnet_b0", "mobilenet_v2")


def _console_reporter(stream_is_tty: bool):
    """A progress bar per epoch on a terminal; one plain line per epoch otherwise."""
    from plantml.training.config import Reporter

    class ConsoleReporter(Reporter):
        def images(self, iterable: Iterable, *, total: int) -> Iterable:
            return scan_bar(iterable, total=total, stream_is_tty=stream_is_tty)

        def batches(self, iterable: Iterable, *, epoch: int, epochs: int, total: int) -> Iterable:
            return iteration_bar(iterable, total=total, desc=f"epoch {epoch}/{epochs}", unit="batch",
                                 stream_is_tty=stream_is_tty)

        def epoch_end(self, record: dict[str, float]) -> None:
            click.echo(
                f"epoch {record['epoch']}/{record['epochs']}  "
                f"train_loss {record['train_loss']:.4f}  train_acc {record['train_accuracy']:.4f}  "
                f"val_loss {record['val_loss']:.4f}  val_acc {record['val_accuracy']:.4f}  "
                f"lr {record['learning_rate']:.2e}  {record['seconds']:.1f}s"
            )

        def message(self, text: str) -> None:
            click.echo(text, err=True)

    return ConsoleReporter()


@click.command("train", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--backbone", type=click.Choice(BACKBONE_NAMES), default="resnet18", help="torchvision model to fine-tune.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, help="Number of epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Images per batch.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-3, help="AdamW learning rate.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-2, help="AdamW weight decay.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="Device [default: cuda when present, else cpu].")
@click.option("--freeze-backbone", is_flag=True, help="Train only the classifier head (until --unfreeze-epoch).")
@click.option("--unfreeze-epoch", type=click.IntRange(min=1), default=None, help="Epoch (1-based) at which the whole network starts training; needs --freeze-backbone.")
@click.option("--early-stopping-patience", type=click.IntRange(min=1), default=10, help="Epochs without val_loss improvement before stopping.")
@click.option("--data-dir", default=None, help="Image folder (one sub-folder per class) or a pushed set s3://BUCKET/PREFIX [default: the built-in synthetic leaf set].")
@click.option("--skip-bad-images", is_flag=True, help="Leave out images that cannot be decoded (counted in the skipped_images param) instead of failing.")
@click.option("--val-split", type=float, default=0.15, help="Fraction of each class for validation.")
@click.option("--test-split", type=float, default=0.15, help="Fraction of each class for the final test.")
@click.option("--weights", default="auto", metavar="auto|imagenet|none|PATH", help="Initial weights: auto = ImageNet if in torch's cache, else random.")
@click.option("--image-size", type=click.IntRange(16, 1024), default=None, help="Square input size in pixels [default: 224 on cuda, 64 on cpu].")
@click.option("--seed", type=int, default=42, help="Seed of the split, the initialisation and the batch order.")
@click.option("--num-workers", type=click.IntRange(min=0), default=None, help="DataLoader workers [default: sized to the machine].")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (bf16, or fp16 where bf16 is missing) [default: on for cuda].")
@click.option("--channels-last/--no-channels-last", default=None, help="channels-last memory format [default: on for cuda].")
@click.option("--data-on-device/--no-data-on-device", default=None, help="Decode the images on the GPU and build batches there: once for the whole set when it fits in a quarter of free GPU memory, else batch by batch [default: on for cuda].")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model (slower start; measure before relying on it).")
@click.option("--output-dir", type=click.Path(path_type=Path, file_okay=False), default=None, help="Also keep best_model.pth and training_history.json here.")
@click.option("--experiment-name", type=NON_BLANK, default=None, help="MLflow experiment [default: $MLFLOW_EXPERIMENT_NAME or plant_classification].")
@click.option("--run-name", default=None, help="MLflow run name [default: {backbone}_{date-time}].")
@click.option("--tracking-uri", type=NON_BLANK, default=None, help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, .env, or sqlite:///mlflow.db].")
@click.option("--registered-model-name", default=None, help="Registry name of the best model [default: {backbone}_plant_classifier].")
@click.option("--no-register", is_flag=True, help="Log the best model without registering it.")
@click.option("--no-mlflow", is_flag=True, help="Train without any tracking (nothing from mlflow is imported).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Start N training processes on this machine (DDP; one per GPU, or several on a CPU), as torchrun --standalone does.")
@click.pass_context
def train(ctx: click.Context, **options) -> int | None:
    """Train a plant classifier; track params, metrics, artifacts and the model in MLflow.

    Under torchrun (or with --nproc) the processes train one model together; --batch-size
    is per process, and only rank 0 talks to MLflow and prints.
    """
    _check_before_loading(options)
    from plantml.tracking import signals
    from plantml.training import distributed
    from plantml.training.checks import check_config
    from plantml.training.config import Reporter, TrainConfig
    from plantml.training.launch import follow_launcher
    from plantml.training.run import fit
    from plantml.training.synth import SynthSpec

    config = TrainConfig(
        backbone=options["backbone"], epochs=options["epochs"], batch_size=options["batch_size"],
        learning_rate=options["learning_rate"], weight_decay=options["weight_decay"], device=options["device"],
        freeze_backbone=options["freeze_backbone"], unfreeze_epoch=options["unfreeze_epoch"],
        early_stopping_patience=options["early_stopping_patience"], data_dir=options["data_dir"],
        synthetic=SynthSpec(), skip_bad_images=options["skip_bad_images"], val_split=options["val_split"],
        test_split=options["test_split"], weights=options["weights"], image_size=options["image_size"],
        seed=options["seed"], num_workers=options["num_workers"], amp=options["amp"],
        channels_last=options["channels_last"], data_on_device=options["data_on_device"],
        compile=options["compile_model"], run_name=options["run_name"],
        register=not options["no_register"], registered_model_name=options["registered_model_name"],
        output_dir=options["output_dir"],
    )
    if options["nproc"]:  # a flag error is one line here, before N processes start and each says it
        check_config(config)
        return _launch(ctx, options["nproc"], options)
    started = time.perf_counter()
    follow_launcher()  # a rank of plantml train --nproc stops when its launcher is killed
    with distributed.session(config.device) as ranks, contextlib.ExitStack() as stop_signals:
        show_warnings(ranks.is_main)
        # SIGTERM or SIGHUP while the data is pulled or made (or while one process trains untracked) ends the
        # command like Ctrl-C: one line, 128 + the signal, no staging folder left; the tracker handles them in a run
        stop_signals.enter_context(signals.handled())
        reporter = _console_reporter(sys.stderr.isatty()) if ranks.is_main else Reporter()  # the others train silently
        # every input error surfaces here, before any run exists; on any rank, it stops them all
        prepared, tracker = ranks.agree(lambda: _prepare_and_connect(config, options, ranks, reporter))
        if ranks.distributed:
            stop_signals.close()  # torchrun stops the ranks of a distributed training
        ranks.require_same(prepared.scan.content_hash, f"the content of {prepared.source.name}")
        if not ranks.is_main:
            fit(prepared, tracker, reporter)
            return None
        _echo_data(prepared)
        result = fit(prepared, tracker, reporter)
    click.echo(
        f"best epoch {result.best_epoch}: val_loss {result.best_val_loss:.4f}, val_acc {result.best_val_accuracy:.4f}; "
        f"test_loss {result.test.loss:.4f}, test_acc {result.test.accuracy:.4f}  ({time.perf_counter() - started:.1f}s)"
    )
    if result.run_id:
        from plantml.ui import how_to_see

        click.echo(mask_passwords(f"run {result.run_id} in experiment {tracker.experiment_name!r} at {tracker.tracking_uri}"))
        default_store = tracker.settings.source_of("tracking_uri") == "default"
        click.echo(mask_passwords(how_to_see(tracker.tracking_uri, tracker.experiment_id, result.run_id, default_store)))
    return None


def _check_before_loading(options: dict) -> None:
    """The inputs that need neither torch nor MLflow, checked before their import (9 s on a 2-core machine): a
    missing ``--data-dir`` or one of fewer than two classes (each rank checks the rest), a mistyped tracking URI, a
    cache or journal folder that cannot be written (a service account's HOME) each say so in a second; a tracking
    server that does not answer, after the tracker's own wait for one (not after the data is made or pulled too)."""
    from plantml.datasets.manifest import class_folders
    from plantml.datasets.remote import is_s3_uri
    from plantml.settings import cache_dir, env_value, resolve_tracking_settings
    from plantml.staging import CACHE_FOLDER, check_writable
    from plantml.tracking.journal_io import JOURNAL_FOLDER, journal_dir

    data_dir = options["data_dir"]
    if data_dir is not None and not is_s3_uri(data_dir):
        class_folders(Path(data_dir).expanduser())
    else:  # the synthetic set is made there, a set in the object store pulled there
        check_writable(CACHE_FOLDER, cache_dir())
    if not options["no_mlflow"]:
        Path.home()  # MLflow asks for it at its import: an account with none is said now (see plantml.cli.main)
        settings = resolve_tracking_settings(tracking_uri=options["tracking_uri"], experiment_name=options["experiment_name"])
        # the one process that will track, alone: one rank of several failing here would leave the others waiting
        # for it in torchrun's rendezvous (in a job, rank 0's tracker says these inside ranks.agree, to every rank)
        if env_value("WORLD_SIZE") == "1":
            check_writable(JOURNAL_FOLDER, journal_dir(), mode=0o700)
            if settings.tracking_uri.startswith(("http://", "https://")):
                from plantml.tracking.connection import wait_for_server
                from plantml.tracking.tracker import CONNECT_TIMEOUT_S

                wait_for_server(settings.tracking_uri, CONNECT_TIMEOUT_S, settings.source_of("tracking_uri"))


def _prepare_and_connect(config, options: dict, ranks, reporter):
    """Check the inputs and load the data (:func:`prepare`), then connect rank 0's tracker (an
    unreachable server fails here, still before any run); the other ranks get a NullTracker."""
    from plantml.training.config import NullTracker
    from plantml.training.run import prepare

    prepared = prepare(config, ranks, reporter)
    return prepared, _make_tracker(options) if ranks.is_main else NullTracker()


def _echo_data(prepared) -> None:
    """The line that says what is about to train, and on what."""
    config, ranks = prepared.config, prepared.ranks
    sizes = prepared.loaders.split.sizes()
    source = prepared.source
    if source.kind == "s3":
        fetched = (f"{source.downloaded_files} files, {source.downloaded_bytes / 1e6:.1f} MB downloaded" if source.downloaded_files
                   else "cached, nothing downloaded")
        click.echo(f"data: {source.uri} ({fetched}) -> {source.folder}", err=True)
    click.echo(
        f"data: {source.name} ({len(prepared.scan.classes)} classes; "
        f"{sizes['train_size']}/{sizes['val_size']}/{sizes['test_size']} train/val/test)  "
        f"model: {config.backbone} ({prepared.weights.label} weights, {prepared.image_size}px)  device: {prepared.device.type}"
        + (f" x {ranks.world_size} processes ({ranks.backend}, {config.batch_size * ranks.world_size} images per step)"
           if ranks.distributed else ""),
        err=True,
    )


def _launch(ctx: click.Context, nproc: int, options: dict) -> int:
    """``--nproc N``: this process becomes torchrun's agent and starts N ranks of the same command."""
    from plantml.errors import RankFailed
    from plantml.training.launch import launch

    try:
        code = launch(nproc, _worker_args(ctx))
    except RankFailed:
        _end_runs_the_ranks_left(options)
        raise
    if code > 128:
        import signal

        click.echo(f"plantml: stopped by {signal.Signals(code - 128).name}", err=True)
    if code:
        _end_runs_the_ranks_left(options)
    return code


def _end_runs_the_ranks_left(options: dict) -> None:
    """A rank 0 killed outright (``kill -9``, the out-of-memory killer, or the agent's SIGKILL after a stop it
    could not answer, stuck in a collective) could not end its run: end it KILLED from its journal now, with
    what it had logged, rather than leave it RUNNING until the next training in this folder."""
    if options["no_mlflow"]:
        return
    from plantml.settings import resolve_tracking_settings
    from plantml.tracking.recover import recover_at_start
    from plantml.tracking.sender import resolve_delivery_settings
    from plantml.tracking.tracker import RECOVER_AT_START_S

    show_warnings()
    settings = resolve_tracking_settings(tracking_uri=options["tracking_uri"], experiment_name=options["experiment_name"])
    recover_at_start(resolve_delivery_settings(), settings, RECOVER_AT_START_S)


def _worker_args(ctx: click.Context) -> list[str]:
    """``-m plantml train …`` as each rank runs it: this command's flags, without ``--nproc``."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if param.name == "nproc" or value is None or value == param.default:
            continue
        if isinstance(param, click.Option) and param.is_flag:
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
        else:
            args += [param.opts[0], str(value)]
    debug = ["--debug"] if (ctx.find_root().obj or {}).get("debug") else []
    return ["-m", "plantml", *debug, "train", *args]


def _make_tracker(options: dict):
    if options["no_mlflow"]:
        from plantml.training.config import NullTracker

        return NullTracker()
    from plantml.tracking import MLflowTracker

    # SIGTERM, SIGHUP, Ctrl-C: the run ends KILLED with one line, and journals of dead processes are delivered first
    tracker = MLflowTracker(tracking_uri=options["tracking_uri"], experiment_name=options["experiment_name"],
                            handle_signals=True)
    tracker.check_artifact_access()  # before the training, not after it, when the model could not be stored
    return tracker
