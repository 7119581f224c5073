"""``MLflowTracker``: the design's tracking wrapper, on its own client and explicit run ids.

Like Lightning's ``MLFlowLogger``, the tracker never touches MLflow's fluent run stack
(``mlflow.start_run``): it owns an ``MlflowClient`` bound to its tracking URI and passes
run ids explicitly, so two trackers on two servers in one process do not interfere.
Params, metrics, tags, artifacts and models are validated here, then leave through one
writer object: by default the resilient :class:`~plantml.tracking.sender.BufferedWriter`
(a bounded, ordered queue drained by a background sender that retries, spills to disk
and journals what it cannot deliver; see :mod:`plantml.tracking.sender`), or the
synchronous :class:`~plantml.tracking.batching.BatchWriter` when given as ``writer=``.
mlflow is imported on first use, so ``import plantml`` stays fast.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import time
import traceback
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from plantml.errors import PlantmlError, TrackingError, UsageError, ValidationError
from plantml.settings import TrackingSettings, resolve_tracking_settings
from plantml.tracking import validation as check
from plantml.tracking.batching import MetricPoint, Writer, _one_line
from plantml.tracking.delivery import Delivery, discard_spool
from plantml.tracking.environ import GLOBAL_STATE_LOCK, scoped_environ
from plantml.tracking.sender import BufferedWriter, DeliveryPending, DeliverySettings, resolve_delivery_settings

logger = logging.getLogger(__name__)

#: How models are saved: a pickled ``nn.Module`` (see :meth:`MLflowTracker.log_model`).
MODEL_FORMAT = "pickle"

#: Seconds the constructor waits for an HTTP tracking server before giving up.
CONNECT_TIMEOUT_S = 10.0

_GLOBAL_STATE_LOCK = GLOBAL_STATE_LOCK
_LIVE_TRACKERS: weakref.WeakSet[MLflowTracker] = weakref.WeakSet()
_ATEXIT_REGISTERED = False


class TrackedRun:
    """The run :meth:`MLflowTracker.start_run` opened; as a context manager it always ends it.

    Leaving the ``with`` block normally ends the run ``FINISHED``; an exception ends it
    ``FAILED`` (``KILLED`` for Ctrl-C) with the error type, message and traceback recorded
    as ``plantml.error.*`` tags, then lets the exception propagate.
    """

    def __init__(self, tracker: MLflowTracker, run: Any) -> None:
        self.tracker = tracker
        self.run_id: str = run.info.run_id
        self.info = run.info

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.tracker.run_id != self.run_id:
            return  # already ended inside the block
        if exc is None:
            self.tracker.end_run("FINISHED")
            return
        self.tracker._fail_run(exc)

    def __repr__(self) -> str:
        return f"TrackedRun(run_id={self.run_id!r})"


@dataclass
class PendingModel:
    """What :meth:`MLflowTracker.log_model` returns when the model is not stored yet.

    Delivery goes on in the background; once it is done, the model and its registry
    version appear on the server (or, if the run ends first, in its journal).
    """

    artifact_path: str
    registered_model_name: str | None = None
    registered_model_version: int | None = None
    model_id: str | None = None
    model_uri: str | None = None
    pending: bool = True


class MLflowTracker:
    """Log runs, params, metrics, artifacts and models to MLflow, one client per tracker.

    Every setting resolves as: argument, then environment (``MLFLOW_TRACKING_URI``,
    ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``), then a ``.env`` file, then MLflow's local
    ``sqlite:///mlflow.db`` with artifacts under ``./mlruns``. The experiment is created
    when missing.

    Logging only enqueues: a background sender delivers in order, retrying while the
    server or the object store is away. ``delivery_timeout`` (``$PLANTML_DELIVERY_TIMEOUT``,
    60 s) is how long :meth:`end_run` and :meth:`log_model` wait for delivery;
    ``max_buffered`` (``$PLANTML_MAX_BUFFERED``, 100,000) bounds the entries kept in
    memory before spilling to disk; ``journal_dir`` (``$PLANTML_JOURNAL_DIR``,
    ``~/.cache/plantml/journal``) holds spill files, spooled artifacts and journals.
    ``writer`` replaces the write path (``BatchWriter`` for the synchronous one).
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
        writer: Writer | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        delivery_timeout: float | None = None,
        max_buffered: int | None = None,
        journal_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings: TrackingSettings = resolve_tracking_settings(
            tracking_uri, experiment_name, s3_endpoint, aws_access_key, aws_secret_key, env_file=env_file
        )
        check.check_experiment_name(self.settings.experiment_name)
        self.delivery_settings: DeliverySettings = resolve_delivery_settings(delivery_timeout, max_buffered, journal_dir)
        self._client = self._connect(connect_timeout)
        self.experiment_id: str = self._ensure_experiment()
        self._delivery = Delivery(self.settings, self._client, self.experiment_id, self.delivery_settings.request_timeout_s)
        self._writer: Writer = writer or BufferedWriter(self._delivery, self.delivery_settings)
        self._run_id: str | None = None
        self._spooled = 0
        self._params: dict[str, str] = {}
        _track_for_exit(self)

    def __repr__(self) -> str:
        return f"MLflowTracker(tracking_uri={self.tracking_uri!r}, experiment={self.settings.experiment_name!r}, run_id={self._run_id!r})"

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
        """The id of the active run, or None."""
        return self._run_id

    @property
    def client(self) -> Any:
        """This tracker's own ``mlflow.MlflowClient``."""
        return self._client

    # -- connection -------------------------------------------------------------------

    def _connect(self, timeout: float) -> Any:
        if self.tracking_uri.startswith(("http://", "https://")):
            _wait_for_server(self.tracking_uri, timeout, self.settings.source_of("tracking_uri"))
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _ensure_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.experiment_name
        try:
            experiment = self._client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    return self._client.create_experiment(name)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    experiment = self._client.get_experiment_by_name(name)  # created meanwhile
        except PlantmlError:
            raise
        except Exception as exc:
            raise TrackingError(f"{self.tracking_uri}: cannot open experiment {name!r}: {_one_line(exc)}") from exc
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"{self.tracking_uri}: experiment {name!r} is deleted; restore it or choose another name")
        return experiment.experiment_id

    # -- runs -------------------------------------------------------------------------

    def start_run(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None) -> TrackedRun:
        """Start a run in the tracker's experiment; usable as ``with tracker.start_run(...):``."""
        if self._run_id is not None:
            raise UsageError(f"run {self._run_id} is still active: call end_run() before starting another")
        checked_tags = self._checked_tags(tags or {})
        run = self._call("start a run", self._client.create_run, self.experiment_id, run_name=run_name)
        self._run_id, self._params = run.info.run_id, {}
        try:
            self._writer.write(self._run_id, tags=checked_tags)
        except BaseException as exc:
            self._fail_run(exc)
            raise
        return TrackedRun(self, run)

    def end_run(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """End the active run with ``status`` (FINISHED, FAILED or KILLED); no-op without one.

        Waits up to ``timeout`` seconds (the tracker's ``delivery_timeout`` by default) for
        everything logged to be delivered, then sets the status. If delivery is not
        complete by then, the rest goes to a journal on disk, the run is tagged
        ``plantml.delivery=pending`` and marked FAILED (never FINISHED) where the server
        answers, and :class:`~plantml.tracking.sender.DeliveryPending` names the journal:
        ``plantml tracking replay JOURNAL`` delivers it and sets the true status.
        """
        check.check_status(status)
        run_id = self._run_id
        if run_id is None:
            return
        finish = getattr(self._writer, "finish", None)
        if finish is None:  # a synchronous writer: everything has arrived when write returned
            try:
                self._writer.flush(run_id)
            except BaseException:
                status = "FAILED"  # what was logged did not all arrive: the run is not a success
                raise
            finally:
                self._run_id, self._params = None, {}
                self._call(f"end run {run_id}", self._delivery.terminate, run_id, status)
                logger.info("run %s ended %s (%s)", run_id, status, self.tracking_uri)
            return
        self._run_id, self._params = None, {}
        journal = finish(run_id, status, timeout)
        if journal is None:
            logger.info("run %s ended %s (%s)", run_id, status, self.tracking_uri)
            return
        raise DeliveryPending(
            f"run {run_id}: not everything was delivered to {self.tracking_uri} in time "
            f"({getattr(self._writer, 'last_error', None) or 'no answer'}); the run is not marked {status}. "
            f"What is missing is in {journal}: deliver it with `plantml tracking replay {journal}`",
            journal,
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far is delivered; False if ``timeout`` passed first."""
        if isinstance(self._writer, BufferedWriter):
            return self._writer.flush(self._run_id, timeout)
        self._writer.flush(self._run_id)
        return True

    def _fail_run(self, exc: BaseException) -> None:
        """Record ``exc`` on the active run and end it FAILED (KILLED on Ctrl-C), never raising."""
        run_id = self._run_id
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            self._writer.write(run_id, tags=_error_tags(exc))
        except Exception as record_exc:  # the original error matters more than this one
            logger.warning("run %s: could not record the error: %s", run_id, record_exc)
        try:
            self.end_run(status)
        except Exception as end_exc:
            logger.warning("run %s: could not end it %s: %s", run_id, status, end_exc)

    def _require_run(self) -> str:
        if self._run_id is None:
            raise UsageError("no active run: call start_run() first")
        return self._run_id

    # -- params, metrics, tags --------------------------------------------------------

    def log_param(self, key: str, value: Any) -> None:
        """Log one param; a value changed within a run is refused (params are immutable)."""
        self.log_params({key: value})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log several params in as few ``log_batch`` requests as MLflow allows."""
        run_id = self._require_run()
        new: dict[str, str] = {}
        for key, value in check.check_mapping("params", params).items():
            text = check.param_value(check.check_name("param", key), value)
            logged = self._params.get(key)
            if logged is not None and logged != text:
                raise ValidationError(f"param {key!r}: already logged as {logged!r} in run {run_id}, cannot change it to {text!r}")
            if logged is None:
                new[key] = text
        self._writer.write(run_id, params=list(new.items()))
        self._params.update(new)

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        """Log one metric value at ``step`` (0 when None), stamped with the current time."""
        self.log_metrics({key: value}, step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log several metric values at one ``step``, in as few requests as MLflow allows."""
        run_id = self._require_run()
        timestamp = int(time.time() * 1000)
        points = [
            MetricPoint(
                check.check_name("metric", key),
                check.metric_value(key, value),
                timestamp,
                check.metric_step(key, step),
            )
            for key, value in check.check_mapping("metrics", metrics).items()
        ]
        self._writer.write(run_id, metrics=points)

    def log_training_metrics(
        self,
        epoch: int,
        train_loss: float,
        train_acc: float,
        val_loss: float,
        val_acc: float,
        learning_rate: float | None = None,
    ) -> None:
        """Log one epoch as ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``learning_rate`` at step ``epoch``."""
        metrics = {"train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc}
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate
        self.log_metrics(metrics, step=epoch)

    def set_tag(self, key: str, value: Any) -> None:
        """Set one tag on the active run (tags, unlike params, may change)."""
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags on the active run in as few requests as MLflow allows."""
        run_id = self._require_run()
        self._writer.write(run_id, tags=self._checked_tags(tags))

    def _checked_tags(self, tags: Mapping[str, Any]) -> list[tuple[str, str]]:
        return [
            (check.check_name("tag", key), check.tag_value(key, value))
            for key, value in check.check_mapping("tags", tags).items()
        ]

    def log_system_metrics(self) -> dict[str, Any]:
        """Log machine facts (python_version, platform, cpu_count, memory_gb, torch/GPU) as params.

        They are facts about the run, not time series, so they are params: comparable across
        runs in the UI and searchable as ``params.cpu_count``. Returns what was logged.
        """
        from plantml.tracking.system import system_facts

        facts = system_facts()
        self.log_params(facts)
        return facts

    # -- artifacts --------------------------------------------------------------------
    # Each artifact is copied (or written) into a spool folder first, so the caller may
    # delete or change its file at once; the sender uploads it after everything logged
    # before it, retrying while the object store is away, then removes the copy.

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload one existing file to the run's artifacts, under ``artifact_path`` if given."""
        run_id = self._require_run()
        local = check.existing_file(path)
        check.check_artifact_subpath(artifact_path)
        spooled = self._spool_path(run_id, local.name)
        shutil.copy2(local, spooled)
        self._send_artifact(run_id, spooled, artifact_path, is_dir=False)

    def log_artifacts(self, dir: str | os.PathLike[str], artifact_path: str | None = None) -> None:  # noqa: A002 - the design's name
        """Upload an existing folder's files to the run's artifacts, under ``artifact_path`` if given."""
        run_id = self._require_run()
        local = check.existing_dir(dir)
        check.check_artifact_subpath(artifact_path)
        spooled = self._spool_path(run_id, "dir")
        shutil.copytree(local, spooled)
        self._send_artifact(run_id, spooled, artifact_path, is_dir=True)

    def log_figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib (or plotly) figure as the artifact ``name`` (e.g. ``confusion_matrix.png``)."""
        run_id = self._require_run()
        check.check_artifact_name(name, "figure")
        if not hasattr(fig, "savefig") and not hasattr(fig, "write_image"):
            raise ValidationError(f"figure {name!r}: expected a matplotlib or plotly figure, got {type(fig).__name__}")
        spooled, folder = self._spool_named(run_id, name)
        try:
            if hasattr(fig, "savefig"):
                fig.savefig(spooled)
            elif name.endswith(".html"):
                fig.write_html(spooled)
            else:
                fig.write_image(spooled)
        except Exception as exc:
            raise TrackingError(f"figure {name!r}: could not be saved: {_one_line(exc)}") from exc
        self._send_artifact(run_id, spooled, folder, is_dir=False)

    def log_dict(self, d: Any, name: str) -> None:
        """Save a JSON-serialisable dict as the artifact ``name`` (JSON, or YAML for ``.yaml``)."""
        run_id = self._require_run()
        check.check_artifact_name(name, "dict")
        check.check_json_serialisable(d, name)
        spooled, folder = self._spool_named(run_id, name)
        if name.endswith((".yaml", ".yml")):
            import yaml

            spooled.write_text(yaml.safe_dump(d, default_flow_style=False), encoding="utf-8")
        else:
            spooled.write_text(json.dumps(d, indent=2), encoding="utf-8")
        self._send_artifact(run_id, spooled, folder, is_dir=False)

    def log_text(self, text: str, name: str) -> None:
        """Save a string as the artifact ``name`` (e.g. ``model_summary.txt``)."""
        run_id = self._require_run()
        check.check_artifact_name(name, "text")
        if not isinstance(text, str):
            raise ValidationError(f"text {name!r}: expected a str, got {type(text).__name__}")
        spooled, folder = self._spool_named(run_id, name)
        spooled.write_text(text, encoding="utf-8")
        self._send_artifact(run_id, spooled, folder, is_dir=False)

    def _spool_path(self, run_id: str, name: str) -> Any:
        """A fresh path ``<journal_dir>/spool/<run_id>/<n>/<name>`` (its folder created, itself not)."""
        self._spooled += 1
        folder = self.delivery_settings.journal_dir / "spool" / run_id / f"{self._spooled:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def _spool_named(self, run_id: str, name: str) -> tuple[Any, str | None]:
        """The spool path for artifact ``name`` (``a/b.png``) and the artifact folder it goes to (``a``)."""
        folder, _, base = name.replace("\\", "/").rpartition("/")
        return self._spool_path(run_id, base), folder or None

    def _send_artifact(self, run_id: str, spooled: Any, artifact_path: str | None, is_dir: bool) -> None:
        write_artifact = getattr(self._writer, "write_artifact", None)
        if write_artifact is not None:
            write_artifact(run_id, spooled, artifact_path, is_dir)
            return
        entry = {"artifact": {"src": str(spooled), "dst": artifact_path, "dir": is_dir}}
        with self._artifact_scope(f"upload {spooled.name}"):  # a synchronous writer: upload now
            self._delivery.upload(run_id, entry["artifact"])
        discard_spool(entry)

    @contextlib.contextmanager
    def _artifact_scope(self, action: str) -> Iterator[None]:
        """Apply this tracker's S3 settings while MLflow's artifact code runs; wrap its errors."""
        env = {k: v for k, v in self.settings.client_env().items() if k != "MLFLOW_TRACKING_URI"}
        try:
            with scoped_environ(env):
                yield
        except PlantmlError:
            raise
        except Exception as exc:
            raise TrackingError(f"{self.tracking_uri}: {action} failed: {_one_line(exc)}") from exc

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
        format would give a ``torch.export`` graph that supports neither. Pip requirements default to the running torch/torchvision versions (inferring them
        costs seconds).

        The model is saved to a local spool folder at once; the sender then creates the
        logged model, stores every file, and only then registers a version, so no registry
        version ever points at missing files. This call waits up to ``wait`` seconds (the
        tracker's ``delivery_timeout`` by default) and returns MLflow's ``ModelInfo``; if
        the model is not stored by then it returns a :class:`PendingModel` and delivery
        goes on in the background (the run's end decides its fate).
        """
        run_id = self._require_run()
        check.check_artifact_name(artifact_path, "model")
        fmt = serialization_format or MODEL_FORMAT
        requirements = pip_requirements or _torch_requirements()
        folder = self._spool_path(run_id, "model")
        try:
            import mlflow.pytorch
            from mlflow.models import Model

            mlflow.pytorch.save_model(
                model,
                str(folder),
                mlflow_model=Model(run_id=run_id),
                input_example=input_example,
                signature=signature,
                pip_requirements=requirements,
                serialization_format=fmt,
                **kwargs,
            )
        except PlantmlError:
            raise
        except Exception as exc:
            raise TrackingError(f"model {artifact_path!r}: could not be saved: {_one_line(exc)}") from exc
        spec = {"src": str(folder), "name": artifact_path, "registered_model_name": registered_model_name}
        write_model = getattr(self._writer, "write_model", None)
        if write_model is None:  # a synchronous writer: store and register now
            with self._artifact_scope(f"log model {artifact_path!r}"):
                info = self._delivery.deliver_model(run_id, spec)
            discard_spool({"model": spec})
            return info
        future = write_model(run_id, spec)
        wait = self.delivery_settings.timeout_s if wait is None else wait
        try:
            return future.result(timeout=wait)
        except (TimeoutError, DeliveryPending):
            logger.warning("run %s: model %r not stored after %.0f s; delivery goes on in the background",
                           run_id, artifact_path, wait)
            return PendingModel(artifact_path, registered_model_name)

    # -- search -----------------------------------------------------------------------

    def search_runs(
        self,
        filter_string: str | None = None,
        max_results: int = 100,
        order_by: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Runs of this tracker's experiment as flat dicts (``run_id``, ``metrics.x``, ``params.x``, ``tags.x``)."""
        if isinstance(order_by, str):
            order_by = [order_by]
        runs = self._call(
            "search runs",
            self._client.search_runs,
            [self.experiment_id],
            filter_string=filter_string or "",
            max_results=max_results,
            order_by=order_by,
        )
        return [flatten_run(run) for run in runs]

    def get_best_run(self, metric: str, ascending: bool = False) -> dict[str, Any] | None:
        """The run with the highest ``metric`` (lowest if ``ascending``), or None without any."""
        check.check_name("metric", metric)
        direction = "ASC" if ascending else "DESC"
        key = f"metrics.{metric}"
        # Runs without the metric sort last; a NaN value can sort first, so skip those.
        runs = self.search_runs(max_results=50, order_by=[f"metrics.`{metric}` {direction}"])
        return next((run for run in runs if key in run and run[key] == run[key]), None)

    def _call(self, action: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PlantmlError:
            raise
        except Exception as exc:
            raise TrackingError(f"{self.tracking_uri}: {action} failed: {_one_line(exc)}") from exc


def flatten_run(run: Any) -> dict[str, Any]:
    """One MLflow ``Run`` as the flat dict ``search_runs`` returns (the design's keys)."""
    info = run.info
    flat: dict[str, Any] = {
        "run_id": info.run_id,
        "experiment_id": info.experiment_id,
        "run_name": info.run_name,
        "status": info.status,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "artifact_uri": info.artifact_uri,
    }
    flat.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
    flat.update({f"params.{k}": v for k, v in run.data.params.items()})
    flat.update({f"tags.{k}": v for k, v in run.data.tags.items()})
    return flat


def _wait_for_server(uri: str, timeout: float, source: str = "default") -> None:
    """Raise TrackingError naming ``uri`` and where it came from unless its server answers within ``timeout`` seconds.

    MLflow's own client retries a dead server for about four minutes; this first contact
    fails fast instead.
    """
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=max(1.0, min(5.0, timeout)))
            return  # any HTTP answer means a server is there; MLflow reports what it thinks
        except requests.RequestException as exc:
            if time.monotonic() >= deadline:
                raise TrackingError(f"{uri}: tracking server not reachable ({type(exc).__name__}); "
                                    f"this URI came from {source}") from None
        time.sleep(0.5)


def _torch_requirements() -> list[str]:
    import torch

    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        import torchvision
    except ImportError:
        return requirements
    return [*requirements, f"torchvision=={torchvision.__version__.split('+')[0]}"]


def _error_tags(exc: BaseException) -> list[tuple[str, str]]:
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    limit = check.MAX_TAG_VAL_LENGTH
    return [
        ("plantml.error.type", type(exc).__name__),
        ("plantml.error.message", str(exc)[:limit]),
        ("plantml.error.traceback", trace[-limit:]),
    ]


def _track_for_exit(tracker: MLflowTracker) -> None:
    """Remember ``tracker`` so a run its owner never ended is ended KILLED at exit, not left RUNNING."""
    global _ATEXIT_REGISTERED
    with _GLOBAL_STATE_LOCK:
        _LIVE_TRACKERS.add(tracker)
        if not _ATEXIT_REGISTERED:
            atexit.register(_end_abandoned_runs)
            _ATEXIT_REGISTERED = True


def _end_abandoned_runs() -> None:
    for tracker in list(_LIVE_TRACKERS):
        if tracker.run_id is not None:
            logger.warning("run %s was never ended: ending it KILLED", tracker.run_id)
            try:
                tracker.end_run("KILLED")
            except Exception as exc:
                logger.warning("run %s: could not end it: %s", tracker.run_id, exc)
