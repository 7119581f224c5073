"""How journal records reach MLflow, once, whatever the server did to the last try.

:class:`Transport` makes one attempt of one request, and says what a failure was (a
refusal, a run gone, or worth a retry); :mod:`plantml.tracking.delivery` retries and
narrows on top of it.

Short calls, no hidden retries
    Against an HTTP server, ``log_batch``, the read-back and the run's end are plain
    ``requests`` calls to MLflow's REST API with a short timeout and no retry of their own
    (MLflow's client would retry seven times, about four minutes, per call). Artifacts and
    models go through ``MlflowClient`` with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and a
    short ``MLFLOW_HTTP_REQUEST_TIMEOUT`` applied for the call. A local store (sqlite,
    file) is written through ``MlflowClient`` directly.

Exactly once
    ``log_batch`` is not idempotent in general. Once a try may have reached the server
    (anything but a refused connection), later tries first read back what the server
    stores (the metric history of each key, the run's params) and send only the metric
    points (same key, step, timestamp and value) and params (same value) it lacks; tags
    are resent (the last value wins). A model keeps its progress (logged model id,
    files stored, version registered), so a retry resumes after the last step done, and
    looks for a version it may already have made before registering again.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from plantml.errors import PlantmlError, TrackingError, connection_reason, one_line
from plantml.health import TRACKING_CA_HINT, ServerSession, certificate_refused
from plantml.settings import TrackingSettings
from plantml.text import mask_passwords
from plantml.tracking.entries import DatasetInput, End, MetricPoint, Model, ModelProgress, Param, Record, Tag
from plantml.tracking.environ import scoped_environ
from plantml.tracking.models import MODEL_STEPS_ENV, deliver_model
from plantml.tracking.validation import INT64_MAX, INT64_MIN

#: MLflow error codes that no retry can fix.
PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED",
    "BAD_REQUEST", "INVALID_STATE", "ENDPOINT_NOT_FOUND", "FEATURE_DISABLED",
})
#: S3 error codes about one object (its key, its size): no retry can store that artifact, so it is set aside.
#: Credentials, a missing bucket or an outage are not among them: those fail every artifact, and are retried.
S3_OBJECT_REFUSALS = frozenset({
    "InvalidRequest", "KeyTooLongError", "EntityTooLarge", "InvalidArgument", "InvalidObjectName", "XMinioInvalidObjectName",
})
#: Seconds one request may take before it counts as failed.
DEFAULT_REQUEST_TIMEOUT_S = 10.0
#: Tags the write path sets on runs.
DELIVERY_TAG = "plantml.delivery"
REJECTED_TAG = "plantml.rejected"


class ServerError(TrackingError):
    """The tracking server answered a request with an error status."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {error_code}: {message}".replace("\n", " "))
        self.status = status
        self.error_code = error_code


class Refused(TrackingError):
    """The server (or the client, building the request) will never take this request as it is."""


class RunGone(TrackingError):
    """The run is deleted, does not exist, or cannot be read with these credentials: nothing can be delivered to it."""


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def surely_unsent(exc: BaseException) -> bool:
    """True when the request cannot have reached the server (no connection was made)."""
    import requests
    from urllib3.exceptions import NewConnectionError

    for link in _chain(exc):
        if isinstance(link, (requests.exceptions.ConnectTimeout, NewConnectionError, ConnectionRefusedError)):
            return True
        if isinstance(link, requests.exceptions.ConnectionError) and link.args and isinstance(
            getattr(link.args[0], "reason", None), NewConnectionError
        ):
            return True
    return False


def is_refusal(exc: BaseException) -> bool:
    """True for a failure no retry can fix: a 4xx other than 408/429, a request that cannot be built."""
    if isinstance(exc, Refused):
        return True
    if isinstance(exc, ServerError):
        return 400 <= exc.status < 500 and exc.status not in (408, 429)
    if isinstance(exc, PlantmlError):
        return False
    if isinstance(exc, (FileNotFoundError, OverflowError)):
        return True  # a spooled file gone for good; a number the client cannot encode
    if any(isinstance(link, UnicodeError) for link in _chain(exc)):
        return True  # a text the client cannot encode, also wrapped by MLflow's database store in an INTERNAL_ERROR
    if isinstance(exc, ValueError) and "out of range" in str(exc).lower():
        return True  # protobuf refusing an int64 it cannot hold
    if _s3_error_code(exc) in S3_OBJECT_REFUSALS:
        return True
    # requests' HTTPError: a proxied artifact the server refuses as it is (its path, its size); not credentials
    # (401, 403) nor a server that serves no artifacts (404): those fail every artifact and are retried
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status in (400, 413, 414, 422)
    code = getattr(exc, "error_code", None)
    return isinstance(code, str) and code in PERMANENT_ERROR_CODES


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind ``exc`` (boto3 raises its upload error while handling botocore's), or None."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", "")) or None
        seen = seen.__cause__ or seen.__context__
    return None


def end_status(requested: str, model_refused: bool) -> str:
    """The status a run ends with: FAILED rather than FINISHED once one of its models was refused."""
    return "FAILED" if model_refused and requested == "FINISHED" else requested


def _json_number(value: float) -> float | str:
    """A metric value as MLflow's protobuf JSON writes it: non-finite ones as strings."""
    if value - value == 0:
        return value
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def log_batch_body(run_id: str, metrics: Sequence[MetricPoint], params: Sequence[Param], tags: Sequence[Tag]) -> bytes:
    """The JSON body of MLflow's ``runs/log-batch``, as its protobuf JSON form would write it.

    Built with :mod:`json` rather than protobuf: twenty times cheaper for 1000 metrics
    (25 ms against 1.2 ms measured), so the sender holds the GIL less and logging calls
    wait less. What protobuf would refuse is refused here too: a step or timestamp beyond
    int64 (``ValueError: Value out of range``), a lone surrogate (``UnicodeEncodeError``).
    """
    for m in metrics:
        if not (INT64_MIN <= m.step <= INT64_MAX and INT64_MIN <= m.timestamp <= INT64_MAX):
            raise ValueError(f"Value out of range: step {m.step}, timestamp {m.timestamp}")
    body = {
        "run_id": run_id,
        "metrics": [{"key": m.key, "value": _json_number(m.value), "timestamp": m.timestamp, "step": m.step} for m in metrics],
        "params": [{"key": p.key, "value": p.value} for p in params],
        "tags": [{"key": t.key, "value": t.value} for t in tags],
    }
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _point_id(step: int, timestamp: int, value: float) -> tuple[int, int, Any]:
    return (int(step), int(timestamp), "nan" if math.isnan(value) else float(value))


@dataclass(frozen=True)
class RunState:
    """What the server says about a run: its status, whether it is deleted, its tags."""

    status: str
    deleted: bool
    tags: dict[str, str] = field(default_factory=dict)


class Transport:
    """One attempt at a time of each kind of request, against one tracking URI."""

    def __init__(self, settings: TrackingSettings, client: Any, experiment_id: str,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
        self.settings = settings
        self.client = client
        self.experiment_id = experiment_id
        self.timeout = request_timeout
        self.is_http = settings.tracking_uri.startswith(("http://", "https://"))
        #: Seconds a call waits for MLflow's process-wide settings that another thread's call holds (None: as long as it takes).
        self.lock_wait: float | None = None
        self._session: Any = None
        self.requests_sent = 0
        #: Points known stored, by (run, key), read once and kept while every send may repeat an earlier one (a
        #: recovery): reading a key's whole history for each batch made a replay quadratic in its points.
        self._stored: dict[tuple[str, str], set[tuple[int, int, Any]]] = {}

    def failure_reason(self, exc: BaseException) -> str:
        """One line for a failed try; a certificate this client refused also names what gets past it: the object
        store's setting when the error names its endpoint, else the tracking server's."""
        text = one_line(exc)
        if not certificate_refused(exc):
            url = getattr(getattr(exc, "request", None), "url", None)  # requests' own errors carry their request
            if isinstance(exc, OSError) and isinstance(url, str) and getattr(exc, "response", None) is None:
                # a connection that failed: the server and why, not urllib3's three nested wrappers
                parts = urlsplit(url)
                return mask_passwords(f"{parts.scheme}://{parts.netloc}: {connection_reason(exc)}")
            return text
        if self.settings.s3_endpoint and urlsplit(self.settings.s3_endpoint).netloc in str(exc):
            from plantml.stack.endpoints import s3_tls_hint

            return text + s3_tls_hint(exc)
        return f"{text}; {TRACKING_CA_HINT}"

    def client_env(self) -> dict[str, str]:
        """S3 settings plus MLflow HTTP settings that make one ``MlflowClient`` call fail fast."""
        env = {k: v for k, v in self.settings.client_env().items() if k != "MLFLOW_TRACKING_URI"}
        env.update(MODEL_STEPS_ENV)
        env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, self.timeout * 3)))
        # one try per upload: the sender retries with its own backoff, and a process waits at exit for an upload
        # in flight (boto3's transfer threads), which boto3's own retries made last 3 minutes to a hung object store
        env["AWS_MAX_ATTEMPTS"] = "1"
        return env

    def _rest(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: bytes | None = None) -> dict[str, Any]:
        if self._session is None:
            self._session = ServerSession(self.settings.tracking_uri)
        url = f"{self.settings.tracking_uri.rstrip('/')}/api/2.0/mlflow/{path}"
        response = self._session.request(method, url, params=params, data=body,
                                         headers={"Content-Type": "application/json"},
                                         timeout=(min(3.0, self.timeout), self.timeout))
        self.requests_sent += 1
        if response.status_code >= 400:
            try:
                payload = response.json()
            except ValueError:
                payload = {}
            raise ServerError(response.status_code, str(payload.get("error_code", "")),
                              str(payload.get("message", response.text[:200])))
        return response.json() if response.content else {}

    # -- params, metrics, tags --------------------------------------------------------------------

    def log_batch(self, run_id: str, metrics: Sequence[MetricPoint], params: Sequence[Param], tags: Sequence[Tag]) -> None:
        """One ``log_batch`` request (the caller keeps it within MLflow's limits)."""
        if self.is_http:
            self._rest("POST", "runs/log-batch", body=log_batch_body(run_id, metrics, params, tags))
            return
        from mlflow.entities import Metric, RunTag
        from mlflow.entities import Param as MlflowParam

        self.client.log_batch(run_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step) for m in metrics],
                              params=[MlflowParam(p.key, p.value) for p in params],
                              tags=[RunTag(t.key, t.value) for t in tags], synchronous=True)
        self.requests_sent += 1

    def stored_points(self, run_id: str, key: str) -> set[tuple[int, int, Any]]:
        """(step, timestamp, value) of every point the server stores for ``key``."""
        if not self.is_http:
            return {_point_id(m.step, m.timestamp, m.value) for m in self.client.get_metric_history(run_id, key)}
        found: set[tuple[int, int, Any]] = set()
        token = None
        while True:
            params = {"run_id": run_id, "metric_key": key, **({"page_token": token} if token else {})}
            answer = self._rest("GET", "metrics/get-history", params=params)
            for m in answer.get("metrics", []):
                found.add(_point_id(int(m.get("step", 0)), int(m.get("timestamp", 0)), float(m.get("value", 0.0))))
            token = answer.get("next_page_token")
            if not token:
                return found

    def run_state(self, run_id: str) -> RunState | None:
        """The run's status, lifecycle and tags; None when the server has no such run."""
        try:
            if not self.is_http:
                run = self.client.get_run(run_id)
                return RunState(run.info.status, run.info.lifecycle_stage == "deleted", dict(run.data.tags))
            info = self._rest("GET", "runs/get", params={"run_id": run_id}).get("run", {})
        except Exception as exc:
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" or getattr(exc, "status", None) == 404:
                return None
            raise
        tags = {t["key"]: t.get("value", "") for t in info.get("data", {}).get("tags", [])}
        return RunState(info.get("info", {}).get("status", ""), info.get("info", {}).get("lifecycle_stage") == "deleted", tags)

    def stored_params(self, run_id: str) -> dict[str, str]:
        """The params the server stores for the run."""
        if not self.is_http:
            return dict(self.client.get_run(run_id).data.params)
        answer = self._rest("GET", "runs/get", params={"run_id": run_id})
        return {p["key"]: p.get("value", "") for p in answer.get("run", {}).get("data", {}).get("params", [])}

    def unsent(self, run_id: str, metrics: Sequence[MetricPoint], params: Sequence[Param]
               ) -> tuple[list[MetricPoint], list[Param]]:
        """The metric points and params of a batch that the server does not store yet."""
        stored = {key: self._stored.get((run_id, key)) for key in {m.key for m in metrics}}
        for key, known in stored.items():
            if known is None:
                stored[key] = self._stored[(run_id, key)] = self.stored_points(run_id, key)
        missing_metrics = [m for m in metrics if _point_id(m.step, m.timestamp, m.value) not in stored[m.key]]
        have = self.stored_params(run_id) if params else {}
        return missing_metrics, [p for p in params if have.get(p.key) != p.value]

    def log_input(self, run_id: str, entry: DatasetInput) -> None:
        """Record a data set as the run's input; MLflow keeps one copy however often it is sent."""
        dataset = {"name": entry.name, "digest": entry.digest, "source_type": entry.source_type, "source": entry.source}
        if entry.profile is not None:
            dataset["profile"] = entry.profile
        tags = [{"key": "mlflow.data.context", "value": entry.context}]
        if not self.is_http:
            from mlflow.entities import Dataset, InputTag
            from mlflow.entities import DatasetInput as MlflowDatasetInput

            self.client.log_inputs(run_id, [MlflowDatasetInput(Dataset(**dataset), [InputTag(**tag) for tag in tags])])
            return
        self._rest("POST", "runs/log-inputs", body=json.dumps({"run_id": run_id, "datasets": [{"dataset": dataset, "tags": tags}]}).encode())

    def terminate(self, run_id: str, status: str, end_time: int | None = None) -> None:
        """Set the run's status and end time; repeating it is harmless."""
        end_time = end_time or int(time.time() * 1000)
        if not self.is_http:
            with scoped_environ({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}, wait=self.lock_wait):
                self.client.set_terminated(run_id, status, end_time=end_time)
            return
        self._rest("POST", "runs/update", body=json.dumps({"run_id": run_id, "status": status, "end_time": end_time}).encode())

    # -- one attempt at a batch of records -----------------------------------------------------------

    def send(self, run_id: str, records: Sequence[Record], maybe_sent: bool, progress: ModelProgressBook,
             model_refused: bool = False) -> tuple[int, Any]:
        """Deliver ``records`` (a log batch, or one artifact, model or end) once.

        Returns how many metric points and params the server already had (read back when
        ``maybe_sent``) and, for a model, its ``ModelInfo``.
        """
        entry = records[0].entry
        if isinstance(entry, End):
            status = end_status(entry.status, model_refused)
            self.log_batch(run_id, [], [], [Tag(DELIVERY_TAG, "complete")])
            self.terminate(run_id, status, entry.at)
            return 0, None
        if isinstance(entry, DatasetInput):
            self.log_input(run_id, entry)
            return 0, None
        if isinstance(entry, Model):
            return 0, deliver_model(self, run_id, entry, progress.of(records[0]), maybe_sent,
                                    lambda done: progress.record(records[0], done))
        if not records[0].is_log:
            with scoped_environ(self.client_env()):
                if entry.is_dir:
                    self.client.log_artifacts(run_id, entry.src, entry.dst)
                else:
                    self.client.log_artifact(run_id, entry.src, entry.dst)
            return 0, None
        metrics = [r.entry for r in records if isinstance(r.entry, MetricPoint)]
        params = [r.entry for r in records if isinstance(r.entry, Param)]
        tags = list({r.entry.key: r.entry for r in records if isinstance(r.entry, Tag)}.values())  # a tag's last value
        before = len(metrics) + len(params)
        if maybe_sent:  # the last try may have been stored: send only what the server lacks
            metrics, params = self.unsent(run_id, metrics, params)
        else:
            self._stored.clear()
        if metrics or params or tags:
            try:
                self.log_batch(run_id, metrics, params, tags)
            except BaseException:
                for m in metrics:  # some may be stored now: read again before the next try
                    self._stored.pop((run_id, m.key), None)
                raise
        for m in metrics:
            self._stored.get((run_id, m.key), set()).add(_point_id(m.step, m.timestamp, m.value))
        return before - len(metrics) - len(params), None


class ModelProgressBook:
    """Where a model's delivery progress is read and recorded (the sender's and recovery's journal)."""

    def __init__(self, of: Callable[[Record], ModelProgress], record: Callable[[Record, ModelProgress], None]) -> None:
        self.of = of
        self.record = record
