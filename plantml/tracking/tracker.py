"""``MLflowTracker``: the design's tracking API, its validation, and nothing else.

Like Lightning's ``MLFlowLogger``, the tracker never touches MLflow's fluent run stack
(``mlflow.start_run``): it owns an ``MlflowClient`` bound to its tracking URI and passes
run ids explicitly, so two trackers on two servers in one process do not interfere.
Every call checks its input (:mod:`plantml.tracking.validation`), turns it into typed
entries (:mod:`plantml.tracking.entries`) and hands them to the run's one writer, a
:class:`~plantml.tracking.sender.RunSender`: journalled on local disk before the call
returns, delivered in the background. mlflow is imported on first use, so
``import plantml`` stays fast.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from plantml.errors import PlantmlError, TrackingError, UsageError, one_line
from plantml.settings import TrackingSettings, export_env_file_credentials, resolve_tracking_settings
from plantml.staging import check_writable
from plantml.text import mask_passwords
from plantml.tracking import connection, open_runs, signals
from plantml.tracking import validation as check
from plantml.tracking.active_run import ActiveRun
from plantml.tracking.artifact_calls import ArtifactCalls
from plantml.tracking.entries import DatasetInput, Entry, MetricPoint, Model, Tag
from plantml.tracking.environ import ScopedClient
from plantml.tracking.journal_io import JOURNAL_FOLDER
from plantml.tracking.models import save_model
from plantml.tracking.recover import recover_at_start
from plantml.tracking.runs import PendingModel, TrackedRun, best_run, best_run_order, flatten_run
from plantml.tracking.sender import HEARTBEAT_TAG, DeliveryPending, DeliverySettings, heartbeat_value, resolve_delivery_settings
from plantml.tracking.transport import Transport

logger = logging.getLogger(__name__)

#: How models are saved: a pickled ``nn.Module`` (see :meth:`MLflowTracker.log_model`).
MODEL_FORMAT = "pickle"

#: Seconds the constructor waits for an HTTP tracking server before giving up.
CONNECT_TIMEOUT_S = 10.0
#: Seconds a new tracker spends at most delivering journals of processes that died.
RECOVER_AT_START_S = 10.0


class MLflowTracker(ArtifactCalls):
    """Log runs, params, metrics, artifacts and models to MLflow, one client per tracker.

    Every setting resolves as: argument, then environment (``MLFLOW_TRACKING_URI``,
    ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``), then a ``.env`` file, then MLflow's local
    ``sqlite:///mlflow.db`` with artifacts under ``./mlruns``. The experiment is created
    when missing. MLflow reads a server's user from the environment only:
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` found in the ``.env`` file
    are copied into ``os.environ`` where unset, as the command line does.

    Logging journals and returns: a background sender delivers in order, retrying while
    the server or the object store is away. ``delivery_timeout`` (``$PLANTML_DELIVERY_TIMEOUT``,
    60 s) is how long :meth:`end_run` and :meth:`log_model` wait for delivery;
    ``max_buffered`` (``$PLANTML_MAX_BUFFERED``, 100,000) bounds the entries kept in
    memory (the rest is read back from the journal); ``journal_dir``
    (``$PLANTML_JOURNAL_DIR``, else ``journal`` in ``$PLANTML_CACHE_DIR`` or ``~/.cache/plantml``) holds journals and spooled
    files. ``handle_signals`` ends a run KILLED on SIGTERM, SIGHUP or SIGINT (see
    :mod:`plantml.tracking.signals`). A new tracker first delivers, for up to
    ``recover_timeout`` seconds, the journals that processes which died left for its server.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        s3_endpoint: str | None = None,
        aws_access_key: str | None = None,
        aws_secret_key: str | None = None,
        *,
        env_file: str | os.PathLike[str] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        delivery_timeout: float | None = None,
        max_buffered: int | None = None,
        journal_dir: str | os.PathLike[str] | None = None,
        handle_signals: bool = False,
        recover_timeout: float = RECOVER_AT_START_S,
    ) -> None:
        self.settings: TrackingSettings = resolve_tracking_settings(
            tracking_uri, experiment_name, s3_endpoint, aws_access_key, aws_secret_key, env_file=env_file
        )
        check.check_experiment_name(self.settings.experiment_name)
        if self.settings.tracking_uri.startswith(("http://", "https://")):
            export_env_file_credentials(env_file=env_file)  # a server of ``stack up --auth``: its user is there
        self.delivery_settings: DeliverySettings = resolve_delivery_settings(delivery_timeout, max_buffered, journal_dir)
        # a journal folder nobody can write (HOME read-only, a file in the way) is an input error: say so before any run
        # exists, with the variable that moves it unless the caller named the folder; owner-only, as its journals
        check_writable("journal folder" if journal_dir is not None else JOURNAL_FOLDER,
                       self.delivery_settings.journal_dir, mode=0o700)
        self.handle_signals = handle_signals
        self._client, self.experiment_id = connection.connect(self.settings, connect_timeout)
        self._transport = Transport(self.settings, self._client, self.experiment_id, self.delivery_settings.request_timeout_s)
        self._active: ActiveRun | None = None
        self._requests_done = 0  # by the runs that ended
        self._failed_tries_done = 0
        self._last_error_done: str | None = None
        if recover_timeout > 0:
            recover_at_start(self.delivery_settings, self.settings, recover_timeout)

    def check_artifact_access(self) -> None:
        """Raise a one-line :class:`~plantml.errors.ConfigError` when the experiment stores its artifacts in S3
        and this client has no keys for it: call it before work whose artifacts must not be lost."""
        connection.check_artifact_access(self._client, self.experiment_id, self.settings)

    def __getstate__(self) -> Any:
        """Refused in one line: a tracker holds its process's run, journal lock and sender thread."""
        raise UsageError("an MLflowTracker cannot be pickled or copied (it holds this process's run, journal and sender): "
                         "make one in each process, from the same settings")

    def __repr__(self) -> str:
        return f"MLflowTracker(tracking_uri={mask_passwords(self.tracking_uri)!r}, experiment={self.settings.experiment_name!r}, run_id={self.run_id!r})"

    @property
    def tracking_uri(self) -> str:
        """The tracking server or local store this tracker writes to."""
        return self.settings.tracking_uri

    @property
    def experiment_name(self) -> str:
        """The experiment every run of this tracker belongs to."""
        return self.settings.experiment_name

    @property
    def run_id(self) -> str | None:
        """The id of the active run, or None (also in a process forked from the run's: the run is the parent's)."""
        return self._active.run_id if self._active and not self._active.forked else None

    @property
    def client(self) -> Any:
        """This tracker's own ``mlflow.MlflowClient``, its calls made with the tracker's object store settings."""
        env = {k: v for k, v in self.settings.client_env().items() if k != "MLFLOW_TRACKING_URI"}
        return ScopedClient(self._client, env)

    @property
    def requests_sent(self) -> int:
        """Requests this tracker's runs have sent to the tracking server so far."""
        return self._requests_done + (self._active.sender.transport.requests_sent if self._active else 0)

    @property
    def failed_tries(self) -> int:
        """Delivery tries that failed and were retried, over this tracker's runs (0 when the stack never faltered)."""
        return self._failed_tries_done + (self._active.sender.failed_tries if self._active else 0)

    @property
    def last_delivery_error(self) -> str | None:
        """The one-line cause of the last failed delivery try of the active run, else of the run ended last
        (None when none failed): after a :class:`DeliveryPending`, it says why."""
        return self._active.sender.last_error if self._active else self._last_error_done

    # -- runs -------------------------------------------------------------------------

    def start_run(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None, *,
                  handle_signals: bool | None = None) -> TrackedRun:
        """Start a run in the tracker's experiment; usable as ``with tracker.start_run(...):``.

        Its journal is created first (a full disk fails here, with the run ended FAILED);
        ``handle_signals`` (default: the tracker's) ends it KILLED on SIGTERM, SIGHUP, SIGINT.
        """
        if self.run_id is not None:
            raise UsageError(f"run {self.run_id} is still active: call end_run() before starting another")
        checked = [*self._checked_tags(tags or {}), Tag(HEARTBEAT_TAG, heartbeat_value())]
        name = check.run_name(run_name)
        use_signals = self.handle_signals if handle_signals is None else handle_signals
        if use_signals:
            signals.install()
            signals.on_uncaught(open_runs.end_runs_quietly)
        try:
            with signals.deferred():
                run = self._open_run(name, checked, use_signals)
        except BaseException:
            if use_signals and self._active is None:  # no run to end on a signal: as before
                signals.uninstall()
            raise
        return TrackedRun(self, run)

    def _open_run(self, name: str | None, tags: list[Tag], use_signals: bool) -> Any:
        """Create the run, its journal and its sender; a journal that cannot be written ends the run FAILED."""
        run = self._call("start a run", self._client.create_run, self.experiment_id, run_name=name)
        run_id = run.info.run_id
        try:
            active = ActiveRun.open(run_id, self.settings, self.delivery_settings, self._client, self.experiment_id, use_signals)
        except TrackingError as exc:
            self._call(f"end run {run_id}", self._transport.terminate, run_id, "FAILED")
            raise TrackingError(f"run {run_id} ended FAILED: {exc}") from None
        self._active = active
        open_runs.opened(self)
        active.sender.write(tags)
        return run

    def end_run(self, status: str = "FINISHED", timeout: float | None = None, *, error: BaseException | None = None) -> None:
        """End the active run with ``status`` (FINISHED, FAILED or KILLED); no-op without one.

        ``error`` is recorded as ``plantml.error.*`` tags. Waits up to ``timeout`` seconds
        (the tracker's ``delivery_timeout``; at most ``PLANTML_SIGNAL_TIMEOUT`` after a
        handled signal) for everything logged to be delivered, then sets the status. If
        delivery is not complete by then, the run's journal keeps the rest, the run is
        tagged ``plantml.delivery=pending`` and marked FAILED (never FINISHED) where the
        server answers, and :class:`~plantml.tracking.sender.DeliveryPending` names the
        journal (after a signal the interruption carries that news instead):
        ``plantml tracking recover`` (or ``replay JOURNAL``) delivers it and sets the true status.
        In a process forked from the run's it only forgets the run, which stays the parent's.
        """
        check.check_status(status)
        active = self._active
        if active is None or active.forked:  # a forked child's exit (``with``, atexit) leaves the parent's run alone
            self._active = None
            open_runs.closed(self)
            return
        interrupted = signals.received() if active.signals else None
        if timeout is None:
            timeout = self.delivery_settings.timeout_s
        if interrupted is not None:
            timeout = min(timeout, self.delivery_settings.signal_timeout_s)
        try:
            with signals.deferred():
                self._active = None
                open_runs.closed(self)
                report = active.finish(status, timeout, error)
                self._requests_done += active.sender.transport.requests_sent
                self._failed_tries_done += active.sender.failed_tries
                self._last_error_done = active.sender.last_error
        finally:
            if active.signals:
                signals.uninstall()
        if interrupted is not None:
            interrupted.detail = report.message
            return
        if report.error is not None:
            raise report.error
        logger.info("run %s ended %s (%s)", active.run_id, status, mask_passwords(self.tracking_uri))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far is delivered; False if ``timeout`` passed first."""
        return self._require_run().sender.flush(timeout) if self._active else True

    def _require_run(self) -> ActiveRun:
        if self._active is None:
            raise UsageError("no active run: call start_run() first")
        return self._active.owned()

    def _write(self, entries: list[Entry]) -> None:
        self._require_run().write(entries)

    # -- params, metrics, tags --------------------------------------------------------

    def log_param(self, key: str, value: Any) -> None:
        """Log one param; a value changed within a run is refused (params are immutable)."""
        self.log_params({key: value})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log several params in as few ``log_batch`` requests as MLflow allows."""
        self._require_run().write_params({key: check.param_value(check.check_name("param", key), value)
                                          for key, value in check.check_mapping("params", params).items()})

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        """Log one metric value at ``step`` (0 when None), stamped with the current time."""
        self.log_metrics({key: value}, step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log several metric values at one ``step``, in as few requests as MLflow allows."""
        self._require_run()
        timestamp = int(time.time() * 1000)
        self._write([
            MetricPoint(check.check_name("metric", key), check.metric_value(key, value), timestamp, check.metric_step(key, step))
            for key, value in check.check_mapping("metrics", metrics).items()
        ])

    def log_training_metrics(self, epoch: int, train_loss: float, train_acc: float, val_loss: float, val_acc: float,
                             learning_rate: float | None = None) -> None:
        """Log one epoch as ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``learning_rate`` at step ``epoch``.

        The journal is fsynced soon after: an epoch's metrics survive even a power cut.
        """
        metrics = {"train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc}
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate
        self.log_metrics(metrics, step=epoch)
        self._require_run().sender.request_sync()

    def set_tag(self, key: str, value: Any) -> None:
        """Set one tag on the active run (tags, unlike params, may change)."""
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags on the active run in as few requests as MLflow allows."""
        self._require_run()
        self._write(self._checked_tags(tags))

    def _checked_tags(self, tags: Mapping[str, Any]) -> list[Tag]:
        return [Tag(check.check_user_tag_name(key), check.tag_value(key, value))
                for key, value in check.check_mapping("tags", tags).items()]

    def log_input(self, name: str, digest: str, source: str, source_type: str = "local", *,
                  profile: Mapping[str, Any] | str | None = None, context: str = "training") -> None:
        """Record a data set the active run uses as its MLflow dataset input (the UI's Datasets column).

        ``digest`` identifies the content; MLflow keeps at most 36 characters, so a longer
        one (a SHA-256 hex) is stored as its first 32. ``profile`` (a dict or JSON) shows
        beside it, e.g. split sizes. Searchable as ``dataset.name`` and ``dataset.digest``.
        """
        self._require_run()
        self._write([DatasetInput(**check.dataset_fields(name, digest, source, source_type, profile, context))])

    def log_system_metrics(self) -> dict[str, Any]:
        """Log machine facts (python_version, platform, cpu_count, memory_gb, torch/GPU) as params.

        They are facts about the run, not time series, so they are params: comparable across
        runs in the UI and searchable as ``params.cpu_count``. Returns what was logged.
        """
        from plantml.tracking.system import system_facts

        facts = system_facts()
        self.log_params(facts)
        return facts

    # -- models -----------------------------------------------------------------------

    def log_model(
        self,
        model: Any,
        artifact_path: str = "model",
        registered_model_name: str | None = None,
        input_example: Any = None,
        signature: Any = None,
        pip_requirements: list[str] | None = None,
        serialization_format: str | None = None,
        wait: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Log a PyTorch model with MLflow's pytorch flavor; register it if a name is given.

        The model is saved in MLflow's pickle format unless ``serialization_format`` says
        otherwise, so ``mlflow.pytorch.load_model`` gives back the ``nn.Module`` itself
        (``eval()``, ``train()``, any batch and image size); MLflow 3's default ``pt2``
        format would give a ``torch.export`` graph that supports neither. Pip requirements
        default to the running torch/torchvision versions (inferring them costs seconds).

        The model is saved into the run's spool at once; the sender then creates the logged
        model, stores every file, and only then registers a version, so no registry
        version ever points at missing files. This call then waits up to ``wait`` seconds (the
        tracker's ``delivery_timeout`` by default; saving is not counted) and returns MLflow's ``ModelInfo``; if
        the model is not stored by then it returns a :class:`PendingModel` and delivery
        goes on in the background (the run's end decides its fate).
        """
        active = self._require_run()
        artifact_path = check.check_model_name(artifact_path)
        check.torch_module(model, artifact_path)
        if registered_model_name is not None:
            check.check_registered_model_name(registered_model_name)
        options = {"input_example": input_example, "signature": signature, **kwargs}
        folder = active.spool.write("model", lambda path: save_model(
            path, model, active.run_id, serialization_format or MODEL_FORMAT, pip_requirements, **options), "model", artifact_path)
        with signals.deferred():
            future = active.sender.write_model(Model(str(folder), artifact_path, registered_model_name))
        wait = self.delivery_settings.timeout_s if wait is None else wait
        try:
            return future.result(timeout=wait)
        except (TimeoutError, DeliveryPending):
            logger.warning("run %s: model %r not stored after %.0f s; delivery goes on in the background",
                           active.run_id, artifact_path, wait)
            return PendingModel(artifact_path, registered_model_name)

    # -- search -----------------------------------------------------------------------

    def search_runs(self, filter_string: str | None = None, max_results: int = 100,
                    order_by: list[str] | None = None) -> list[dict[str, Any]]:
        """Runs of this tracker's experiment as flat dicts (``run_id``, ``metrics.x``, ``params.x``, ``tags.x``);
        ``max_results`` from 1 to 50,000 (MLflow's limit for one search), ``order_by`` a string or a list."""
        max_results, order_by = check.search_options(max_results, order_by)
        runs = self._call("search runs", self._client.search_runs, [self.experiment_id],
                          filter_string=filter_string or "", max_results=max_results, order_by=order_by)
        return [flatten_run(run) for run in runs]

    def get_best_run(self, metric: str, ascending: bool = False) -> dict[str, Any] | None:
        """The run with the highest ``metric`` (lowest if ``ascending``), or None without any."""
        check.check_name("metric", metric)
        return best_run(self.search_runs(max_results=50, order_by=[best_run_order(metric, ascending)]), metric)

    def _call(self, action: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PlantmlError:
            raise
        except Exception as exc:
            raise TrackingError(f"{self.tracking_uri}: {action} failed: {one_line(exc)}") from exc

