"""How each queued entry reaches MLflow, once, whatever the server did to the last try.

:class:`Delivery` performs one attempt of one piece of work (a ``log_batch``, an
artifact upload, a model, the run's end) and raises on failure; the sender
(:mod:`plantml.tracking.sender`) decides whether and when to try again.

Short calls, no hidden retries
    Against an HTTP server, ``log_batch``, the metric read-back and the run's end are
    plain ``requests`` calls to MLflow's REST API with a short timeout and no retry of
    their own (MLflow's client would retry seven times, about four minutes, per call).
    Artifacts and models go through ``MlflowClient`` with
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and a short ``MLFLOW_HTTP_REQUEST_TIMEOUT``
    applied for the call (:func:`~plantml.tracking.environ.scoped_environ`). A local store
    (sqlite, file) is written through ``MlflowClient`` directly.

Which failures may have reached the server
    :func:`surely_unsent` is true only when the connection was never made (refused,
    connect timeout): then a batch is resent as it is. Any other failure (a read timeout,
    a reset connection, a 5xx) may have come after the server committed the batch.
    :func:`is_permanent` picks out what no retry can fix (a 4xx such as
    INVALID_PARAMETER_VALUE): the sender records it and moves on.

Exactly once
    ``log_batch`` is not idempotent in general. Before resending a batch whose last try
    may have arrived, :meth:`Delivery.unsent` reads back what the server stores (the
    metric history of each key in the batch, the run's params) and drops every metric
    point already there (same key, step, timestamp and value) and every param already
    set to the same value; tags are resent (last write wins). MLflow's SQL store also
    refuses an exact duplicate point on its own; the read-back makes the guarantee hold
    for any store. A model keeps its progress (logged model id, uploaded, registered) in
    its entry, so a retry resumes where the last try stopped; before creating a registry
    version again it looks for one already made from the same run and logged model.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plantml.errors import PlantmlError, TrackingError
from plantml.settings import TrackingSettings
from plantml.tracking.batching import MetricPoint
from plantml.tracking.environ import scoped_environ
from plantml.tracking.journal import Entry

#: MLflow error codes that no retry can fix.
PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED",
    "BAD_REQUEST", "INVALID_STATE", "ENDPOINT_NOT_FOUND", "FEATURE_DISABLED",
})

#: Seconds one request may take before the sender counts it as failed.
DEFAULT_REQUEST_TIMEOUT_S = 10.0


class ServerError(TrackingError):
    """The tracking server answered a request with an error status."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {error_code}: {message}")
        self.status = status
        self.error_code = error_code


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


def is_permanent(exc: BaseException) -> bool:
    """True for a refusal no retry can fix (a 4xx other than 408/429, a bad request)."""
    if isinstance(exc, ServerError):
        return 400 <= exc.status < 500 and exc.status not in (408, 429)
    if isinstance(exc, PlantmlError):
        return False
    if isinstance(exc, FileNotFoundError):  # a spooled file removed behind our back never comes back
        return True
    code = getattr(exc, "error_code", None)
    return isinstance(code, str) and code in PERMANENT_ERROR_CODES


def _point_id(step: int, timestamp: int, value: float) -> tuple[int, int, Any]:
    return (int(step), int(timestamp), "nan" if math.isnan(value) else float(value))


class Delivery:
    """One attempt at a time of each kind of work, against one tracking URI."""

    def __init__(self, settings: TrackingSettings, client: Any, experiment_id: str,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
        self.settings = settings
        self.client = client
        self.experiment_id = experiment_id
        self.timeout = request_timeout
        self.is_http = settings.tracking_uri.startswith(("http://", "https://"))
        self._session: Any = None
        self.requests_sent = 0

    # -- environment for MlflowClient calls ---------------------------------------------

    def client_env(self) -> dict[str, str]:
        """S3 settings plus MLflow HTTP settings that make one client call fail fast."""
        env = {k: v for k, v in self.settings.client_env().items() if k != "MLFLOW_TRACKING_URI"}
        env.update({
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, self.timeout * 3))),
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        })
        return env

    # -- REST ---------------------------------------------------------------------------

    def _rest(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: str | None = None) -> dict[str, Any]:
        import requests
        from mlflow.utils.credentials import get_default_host_creds

        if self._session is None:
            creds = get_default_host_creds(self.settings.tracking_uri)
            self._session = requests.Session()
            if creds.username and creds.password:
                self._session.auth = (creds.username, creds.password)
            elif creds.token:
                self._session.headers["Authorization"] = f"Bearer {creds.token}"
        url = f"{self.settings.tracking_uri.rstrip('/')}/api/2.0/mlflow/{path}"
        response = self._session.request(
            method, url, params=params, data=body, headers={"Content-Type": "application/json"},
            timeout=(min(3.0, self.timeout), self.timeout),
        )
        self.requests_sent += 1
        if response.status_code >= 400:
            try:
                payload = response.json()
            except ValueError:
                payload = {}
            raise ServerError(response.status_code, str(payload.get("error_code", "")),
                              str(payload.get("message", response.text[:200])))
        return response.json() if response.content else {}

    # -- params, metrics, tags ----------------------------------------------------------

    def log_batch(self, run_id: str, metrics: Sequence[MetricPoint], params: Sequence[tuple[str, str]],
                  tags: Sequence[tuple[str, str]]) -> None:
        """One ``log_batch`` request (the caller keeps it within MLflow's limits)."""
        from mlflow.entities import Metric, Param, RunTag

        mlflow_metrics = [Metric(m.key, m.value, m.timestamp, m.step) for m in metrics]
        mlflow_params = [Param(k, v) for k, v in params]
        mlflow_tags = [RunTag(k, v) for k, v in tags]
        if not self.is_http:
            self.client.log_batch(run_id, metrics=mlflow_metrics, params=mlflow_params, tags=mlflow_tags, synchronous=True)
            self.requests_sent += 1
            return
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.proto_json_utils import message_to_json

        body = message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in mlflow_metrics],
                                        params=[p.to_proto() for p in mlflow_params],
                                        tags=[t.to_proto() for t in mlflow_tags]))
        self._rest("POST", "runs/log-batch", body=body)

    def stored_points(self, run_id: str, key: str) -> set[tuple[int, int, Any]]:
        """(step, timestamp, value) of every point the server stores for ``key``."""
        if not self.is_http:
            return {_point_id(m.step, m.timestamp, m.value) for m in self.client.get_metric_history(run_id, key)}
        found: set[tuple[int, int, Any]] = set()
        token = None
        while True:
            params = {"run_id": run_id, "metric_key": key}
            if token:
                params["page_token"] = token
            answer = self._rest("GET", "metrics/get-history", params=params)
            for m in answer.get("metrics", []):
                found.add(_point_id(int(m.get("step", 0)), int(m.get("timestamp", 0)), float(m.get("value", 0.0))))
            token = answer.get("next_page_token")
            if not token:
                return found

    def stored_params(self, run_id: str) -> dict[str, str]:
        """The params the server stores for the run."""
        if not self.is_http:
            return dict(self.client.get_run(run_id).data.params)
        answer = self._rest("GET", "runs/get", params={"run_id": run_id})
        return {p["key"]: p.get("value", "") for p in answer.get("run", {}).get("data", {}).get("params", [])}

    def unsent(self, run_id: str, metrics: Sequence[MetricPoint], params: Sequence[tuple[str, str]]
               ) -> tuple[list[MetricPoint], list[tuple[str, str]]]:
        """The metric points and params of a batch that the server does not store yet."""
        stored = {key: self.stored_points(run_id, key) for key in {m.key for m in metrics}}
        missing_metrics = [m for m in metrics if _point_id(m.step, m.timestamp, m.value) not in stored[m.key]]
        missing_params = list(params)
        if params:
            have = self.stored_params(run_id)
            missing_params = [(k, v) for k, v in params if k not in have]
        return missing_metrics, missing_params

    # -- run status -----------------------------------------------------------------------

    def terminate(self, run_id: str, status: str, end_time: int | None = None) -> None:
        """Set the run's status (FINISHED, FAILED, KILLED) and end time; repeating it is harmless."""
        end_time = end_time or int(time.time() * 1000)
        if not self.is_http:
            with scoped_environ({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}):
                self.client.set_terminated(run_id, status, end_time=end_time)
            return
        import json

        self._rest("POST", "runs/update", body=json.dumps({"run_id": run_id, "status": status, "end_time": end_time}))

    # -- artifacts and models ---------------------------------------------------------------

    def upload(self, run_id: str, spec: dict[str, Any]) -> None:
        """Upload a spooled file or folder to the run's artifacts; uploading again overwrites."""
        src = spec["src"]
        with scoped_environ(self.client_env()):
            if spec.get("dir"):
                self.client.log_artifacts(run_id, src, spec.get("dst"))
            else:
                self.client.log_artifact(run_id, src, spec.get("dst"))

    def deliver_model(self, run_id: str, spec: dict[str, Any]) -> Any:
        """Create the logged model, store its files, then (only then) register it. Returns ModelInfo.

        Progress is kept in ``spec`` (``model_id``, ``linked``, ``uploaded``, ``version``),
        so a retry, or a replay from a journal, resumes after the last step that succeeded.
        """
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        client = self.client
        with scoped_environ(self.client_env()):
            if not spec.get("model_id"):
                logged = client.create_logged_model(self.experiment_id, name=spec["name"], source_run_id=run_id)
                spec["model_id"] = logged.model_id
                _stamp_mlmodel(Path(spec["src"]), logged.model_id, logged.artifact_location, run_id)
            model_id = spec["model_id"]
            if not spec.get("linked"):
                client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
                spec["linked"] = True
            if not spec.get("uploaded"):
                client.log_model_artifacts(model_id, spec["src"])
                client.finalize_logged_model(model_id, LoggedModelStatus.READY)
                spec["uploaded"] = True
            name = spec.get("registered_model_name")
            if name and spec.get("version") is None:
                spec["version"] = self._register(name, model_id, run_id, spec)
            logged = client.get_logged_model(model_id)
        return _model_info(Path(spec["src"]), logged, spec.get("version"))

    def _register(self, name: str, model_id: str, run_id: str, spec: dict[str, Any]) -> int:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        if spec.get("register_tried"):  # the last try may have created it before failing
            for version in self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
                if version.source == f"models:/{model_id}" or getattr(version, "model_id", None) == model_id:
                    return int(version.version)
        spec["register_tried"] = True
        version = self.client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
        return int(version.version)


def _stamp_mlmodel(folder: Path, model_id: str, artifact_location: str, run_id: str) -> None:
    """Write the logged model's id and location into the spooled MLmodel file, as MLflow's log_model does."""
    from mlflow.models import Model

    mlmodel = folder / "MLmodel"
    model = Model.load(str(mlmodel))
    model.model_id = model_id
    model.model_uuid = model_id
    model.artifact_path = artifact_location
    model.run_id = run_id
    model.save(str(mlmodel))


def _model_info(folder: Path, logged: Any, version: int | None) -> Any:
    from mlflow.models import Model

    info = Model.load(str(folder / "MLmodel")).get_model_info(logged)
    if version is not None:
        info.registered_model_version = version
    return info


def discard_spool(entry: Entry) -> None:
    """Remove the spooled file or folder of a delivered artifact or model entry."""
    spec = entry.get("artifact") or entry.get("model")
    if not spec:
        return
    src = Path(spec["src"])
    if src.is_dir():
        shutil.rmtree(src, ignore_errors=True)
    else:
        src.unlink(missing_ok=True)
