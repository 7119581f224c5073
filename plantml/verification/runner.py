"""Run the eight checks of a tracking installation, yielding one result per check.

The runner writes through the plantml tracker (what users train with) and reads every
write back through its own plain ``MlflowClient``. It stops at the first failure, and
whatever happens, the run it started is ended (FAILED unless every check passed), so a
verification never leaves a run RUNNING. It prints nothing: the command line does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from plantml.errors import ConfigError, PlantmlError
from plantml.health import ask_health, health_url, refusal_hint, tls_failure
from plantml.settings import TrackingSettings
from plantml.staging import scratch_folder
from plantml.text import mask_passwords
from plantml.verification.checks import (
    ARTIFACT,
    CHECKS,
    CONNECTION,
    EXPERIMENT,
    METRIC_STEPS,
    METRICS,
    PARAMS,
    RUN_INFO,
    RUN_START,
    TAGS,
    VERIFICATION_TAG,
    Check,
    CheckResult,
)

#: Seconds allowed for connecting to, then hearing from, the server's /health endpoint.
HEALTH_TIMEOUT = (3.0, 5.0)

ARTIFACT_DIR = "verification"
ARTIFACT_NAME = "verify_mlflow.txt"


class CheckFailed(Exception):
    """A read-back disagreed with what was written; the message is the one-line cause."""


class Tracker(Protocol):
    """What the verification needs of a tracker (``plantml.tracking.MLflowTracker`` fits)."""

    def start_run(self, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> Any: ...
    def log_params(self, params: Mapping[str, Any]) -> Any: ...
    def log_metric(self, key: str, value: float, step: int | None = None) -> Any: ...
    def log_artifact(self, path: Any, artifact_path: str | None = None) -> Any: ...
    def check_artifact_access(self) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> Any: ...
    def end_run(self, status: str = "FINISHED", timeout: float | None = None) -> Any: ...
    @property
    def last_delivery_error(self) -> str | None: ...


TrackerFactory = Callable[[TrackingSettings], Tracker]


def default_tracker(settings: TrackingSettings) -> Tracker:
    """plantml's own :class:`~plantml.tracking.MLflowTracker` for ``settings``."""
    from plantml.tracking import MLflowTracker

    return MLflowTracker(
        tracking_uri=settings.tracking_uri,
        experiment_name=settings.experiment_name,
        s3_endpoint=settings.s3_endpoint,
        aws_access_key=settings.aws_access_key,
        aws_secret_key=settings.aws_secret_key,
    )


class Verification:
    """One verification of ``settings``' server: :meth:`run` yields the eight results.

    After a run, ``run_id`` and ``experiment_id`` name what it created, and
    ``params``/``metric_values``/``tags`` what it wrote, so a test can read them back.
    """

    def __init__(self, settings: TrackingSettings, *, tracker_factory: TrackerFactory | None = None) -> None:
        self.settings = settings
        self.tracker_factory = tracker_factory or default_tracker
        self.verification_id = uuid.uuid4().hex[:12]
        self.run_name = f"plantml-verify-{self.verification_id}"
        self.params = {"test_param_1": "value1", "test_param_2": "42", "verification_id": self.verification_id}
        self.metric_key = "test_metric"
        self.metric_values = [round(0.1 * step + 0.5, 6) for step in range(METRIC_STEPS)]
        self.tags = {"test_tag": "verification", "plantml.verification.id": self.verification_id}
        self.artifact_text = f"plantml verification {self.verification_id}\n"
        self.tracker: Tracker | None = None
        self.client: Any = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self._run_ended = False

    # -- driving ---------------------------------------------------------------------

    def run(self) -> Iterator[CheckResult]:
        """Yield each check's result in order; stop after the first failure."""
        steps: dict[str, Callable[[], None]] = {
            CONNECTION.id: self.check_connection,
            EXPERIMENT.id: self.check_experiment,
            RUN_START.id: self.check_run_start,
            PARAMS.id: self.check_params,
            METRICS.id: self.check_metrics,
            ARTIFACT.id: self.check_artifact,
            TAGS.id: self.check_tags,
            RUN_INFO.id: self.check_run_info,
        }
        passed = False
        try:
            for check in CHECKS:
                result = _attempt(check, steps[check.id])
                yield result
                if not result.ok:
                    return
            passed = True
        finally:
            if not passed:
                self._end_failed_run()

    # -- the eight checks ------------------------------------------------------------

    def check_connection(self) -> None:
        """The server answers /health (http) or the store answers a search (local)."""
        uri = self.settings.tracking_uri
        if uri.startswith(("http://", "https://")):
            _probe_health(uri)
        from plantml.tracking.stores import open_client

        try:  # a missing or empty sqlite file is no installation: MLflow would create a store there
            self.client = open_client(uri, self.settings.source_of("tracking_uri"))
        except PlantmlError as exc:
            raise CheckFailed(str(exc)) from None
        self.client.search_experiments(max_results=1)

    def check_experiment(self) -> None:
        """The tracker is created and its experiment exists, active, on the server."""
        self.tracker = self.tracker_factory(self.settings)
        name = self.settings.experiment_name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            # A tracker may create its experiment lazily, on first use of its id.
            getattr(self.tracker, "experiment_id", None)
            experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            raise CheckFailed(f"experiment {name!r} not found on the server after the tracker was created")
        if experiment.lifecycle_stage != "active":
            raise CheckFailed(f"experiment {name!r} is {experiment.lifecycle_stage}, not active")
        self.experiment_id = experiment.experiment_id

    def check_run_start(self) -> None:
        """The tracker starts a run that the server reports RUNNING in the experiment."""
        tags = {VERIFICATION_TAG: "true", "plantml.verification.id": self.verification_id}
        started = self.tracker.start_run(run_name=self.run_name, tags=tags)
        self.run_id = self._find_run_id(started)
        _flush(self.tracker)
        run = self.client.get_run(self.run_id)
        if run.info.status != "RUNNING":
            raise CheckFailed(f"run {self.run_id} is {run.info.status}, expected RUNNING")
        if run.info.experiment_id != self.experiment_id:
            raise CheckFailed(f"run {self.run_id} is in experiment {run.info.experiment_id}, expected {self.experiment_id}")
        if run.data.tags.get(VERIFICATION_TAG) != "true":
            raise CheckFailed(f"run {self.run_id} lacks the tag {VERIFICATION_TAG}=true")

    def check_params(self) -> None:
        """Logged params read back equal."""
        self.tracker.log_params(dict(self.params))
        _flush(self.tracker)
        stored = self.client.get_run(self.run_id).data.params
        _expect_subset("param", self.params, stored)

    def check_metrics(self) -> None:
        """Five steps of one metric read back with the same steps and values."""
        for step, value in enumerate(self.metric_values):
            self.tracker.log_metric(self.metric_key, value, step=step)
        _flush(self.tracker)
        history = sorted(self.client.get_metric_history(self.run_id, self.metric_key), key=lambda m: m.step)
        got = [(m.step, m.value) for m in history]
        want = list(enumerate(self.metric_values))
        if len(got) != len(want) or any(gs != ws or abs(gv - wv) > 1e-9 for (gs, gv), (ws, wv) in zip(got, want)):
            raise CheckFailed(f"metric {self.metric_key!r} read back as {got}, expected {want}")

    def check_artifact(self) -> None:
        """A logged file is listed in the run's artifacts and downloads with the same bytes."""
        import mlflow.artifacts

        try:  # S3 keys missing in direct mode: say so, rather than wait for an upload that cannot happen
            self.tracker.check_artifact_access()
        except ConfigError as exc:
            raise CheckFailed(str(exc)) from None
        with scratch_folder("plantml-verify") as folder:
            source = Path(folder) / ARTIFACT_NAME
            source.write_text(self.artifact_text, encoding="utf-8")
            self.tracker.log_artifact(source, artifact_path=ARTIFACT_DIR)
            _flush(self.tracker)
            wanted = f"{ARTIFACT_DIR}/{ARTIFACT_NAME}"
            # Reading back goes straight to the artifact store (S3 in direct mode).
            with _artifact_environ(self.settings):
                listed = [info.path for info in self.client.list_artifacts(self.run_id, ARTIFACT_DIR)]
                if wanted not in listed:
                    raise CheckFailed(f"artifact {wanted} not listed in run {self.run_id} (listed: {listed})")
                local = mlflow.artifacts.download_artifacts(
                    run_id=self.run_id, artifact_path=wanted, dst_path=str(Path(folder) / "back"), tracking_uri=self.settings.tracking_uri
                )
            if Path(local).read_text(encoding="utf-8") != self.artifact_text:
                raise CheckFailed(f"artifact {wanted} downloaded with different content")

    def check_tags(self) -> None:
        """Set tags read back equal."""
        self.tracker.set_tags(dict(self.tags))
        _flush(self.tracker)
        stored = self.client.get_run(self.run_id).data.tags
        _expect_subset("tag", self.tags, stored)

    def check_run_info(self) -> None:
        """The run, ended by the tracker, reads back FINISHED with its name, times and data."""
        self.tracker.end_run(status="FINISHED")
        self._run_ended = True
        run = self.client.get_run(self.run_id)
        info = run.info
        problems = []
        if info.status != "FINISHED":
            problems.append(f"status {info.status}, expected FINISHED")
        if info.run_name != self.run_name:
            problems.append(f"name {info.run_name!r}, expected {self.run_name!r}")
        if not info.start_time or not info.end_time or info.end_time < info.start_time:
            problems.append(f"start/end times {info.start_time}/{info.end_time} inconsistent")
        if not info.artifact_uri:
            problems.append("no artifact URI")
        if set(self.params) - set(run.data.params) or self.metric_key not in run.data.metrics:
            problems.append("params or metrics missing from the run")
        if problems:
            raise CheckFailed(f"run {self.run_id}: " + "; ".join(problems))

    # -- helpers ---------------------------------------------------------------------

    def _find_run_id(self, started: Any) -> str:
        """The id of the run the tracker just started, whatever ``start_run`` returned."""
        for candidate in (
            started if isinstance(started, str) else None,
            getattr(getattr(started, "info", None), "run_id", None),
            getattr(started, "run_id", None),
            getattr(self.tracker, "run_id", None),
        ):
            if isinstance(candidate, str) and candidate:
                return candidate
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`plantml.verification.id` = '{self.verification_id}'", max_results=1
        )
        if not runs:
            raise CheckFailed(f"no run tagged plantml.verification.id={self.verification_id} on the server")
        return runs[0].info.run_id

    def _end_failed_run(self) -> None:
        """End a run left open by a failed check as FAILED (best effort)."""
        if self.run_id is None or self._run_ended:
            return
        try:  # what a failed check left undelivered is not waited for: the verification is over
            self.tracker.end_run(status="FAILED", timeout=FAILED_RUN_END_TIMEOUT)
        except Exception:  # noqa: BLE001 - the tracker failed; fall back to the client
            try:
                self.client.set_terminated(self.run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the server is gone; nothing more can be done
                return
        self._run_ended = True


def run_checks(settings: TrackingSettings, *, tracker_factory: TrackerFactory | None = None) -> Iterator[CheckResult]:
    """Yield the eight check results for ``settings`` (see :class:`Verification`)."""
    return Verification(settings, tracker_factory=tracker_factory).run()


def _attempt(check: Check, step: Callable[[], None]) -> CheckResult:
    started = time.monotonic()
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - any failure is this check's one-line cause
        return CheckResult(check, False, _cause(exc), time.monotonic() - started)
    return CheckResult(check, True, "", time.monotonic() - started)


def _probe_health(uri: str) -> None:
    import requests

    url = health_url(uri)
    try:
        response = ask_health(uri, HEALTH_TIMEOUT)
    except requests.exceptions.SSLError as exc:  # a ConnectionError too, but the connection was accepted
        raise CheckFailed(f"{uri}: the TLS handshake failed ({tls_failure(exc)})") from exc
    except requests.exceptions.ConnectionError as exc:
        raise CheckFailed(f"{uri} unreachable (connection refused or no route)") from exc
    except requests.exceptions.Timeout as exc:
        raise CheckFailed(f"{uri} did not answer {url} within {sum(HEALTH_TIMEOUT):.0f} s") from exc
    if response.status_code != 200:
        raise CheckFailed(f"{url} answered HTTP {response.status_code}{refusal_hint(uri, response.status_code)}")


def _artifact_environ(settings: TrackingSettings) -> Any:
    """The S3 endpoint and keys of ``settings`` in ``os.environ`` for one artifact call.

    MLflow's S3 client reads them only from the environment; the tracker's scoped
    helper sets and restores them under its lock.
    """
    from plantml.tracking.environ import scoped_environ

    return scoped_environ({k: v for k, v in settings.client_env().items() if k != "MLFLOW_TRACKING_URI"})


#: Seconds a check waits for the tracker's background sender to deliver what it wrote.
DELIVERY_TIMEOUT = 15.0
#: Seconds the run of a failed verification waits for what is still undelivered before it is ended FAILED.
FAILED_RUN_END_TIMEOUT = 2.0


def _flush(tracker: Any) -> None:
    """Wait for the tracker's sender to deliver what was logged, before reading it back."""
    if not tracker.flush(timeout=DELIVERY_TIMEOUT):
        why = tracker.last_delivery_error
        raise CheckFailed(f"not delivered to the server within {DELIVERY_TIMEOUT:.0f} s"
                          + (f"; last try: {why}" if why else ""))


def _expect_subset(kind: str, wanted: Mapping[str, Any], stored: Mapping[str, str]) -> None:
    wrong = {key: stored.get(key) for key, value in wanted.items() if stored.get(key) != str(value)}
    if wrong:
        key, got = next(iter(wrong.items()))
        raise CheckFailed(f"{kind} {key!r} read back as {got!r}, expected {str(wanted[key])!r}")


def _cause(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    if not isinstance(exc, CheckFailed):
        line = f"{type(exc).__name__}: {line}"
    return mask_passwords(line)[:300]  # the URI as given (http://user:password@host) shows in many causes
