"""Seeing runs: links into MLflow's UI, and MLflow's UI for a local store (``plantml ui``).

MLflow 3's UI opens on its GenAI pages (traces, judges); ``workflowType=machine_learning``
in a page's URL shows the model-training view instead, so every link plantml prints
carries it. For a local store (``sqlite:///mlflow.db`` and the ``./mlruns`` artifacts next
to it) :class:`LocalUI` runs ``mlflow server`` on 127.0.0.1 the way ``plantml stack up``
does: one worker, the job runner off, so it is ready in seconds (``mlflow ui`` with its
defaults starts seven job-runner processes and takes about 25 s on two cores).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plantml.errors import TrackingError, UsageError, foreign_answer, one_line
from plantml.tracking.stores import all_experiments, check_store_exists, open_client, search_batches

#: Query string that opens MLflow's UI in its model-training view.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
LOOPBACK = "127.0.0.1"
DEFAULT_UI_PORT = 5000


def experiment_url(base_url: str, experiment_id: str) -> str:
    """The UI page of an experiment's runs, in the model-training view."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """The UI page of one run, in the model-training view."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def is_server_uri(tracking_uri: str) -> bool:
    """True for a tracking server (http/https), False for a local store plantml can serve itself."""
    return tracking_uri.startswith(("http://", "https://"))


def how_to_see(tracking_uri: str, experiment_id: str, run_id: str, default_uri: bool) -> str:
    """The line ``plantml train`` ends with: the run's URL on a server, the ``plantml ui`` command otherwise."""
    if is_server_uri(tracking_uri):
        return f"see the run: {run_url(tracking_uri, experiment_id, run_id)}"
    command = "plantml ui" if default_uri else f"plantml ui --tracking-uri {shlex.quote(tracking_uri)}"  # pasted into a shell
    return f"see the run: `{command}` in this folder, then open the URL it prints"


@dataclass(frozen=True)
class Landing:
    """Where ``plantml ui`` points: the newest run, or an experiment when no run exists."""

    experiment_id: str
    run_id: str | None = None

    def url(self, base_url: str) -> str:
        """This page's URL on the UI at ``base_url``."""
        if self.run_id is None:
            return experiment_url(base_url, self.experiment_id)
        return run_url(base_url, self.experiment_id, self.run_id)


def newest_run(tracking_uri: str) -> Landing | None:
    """The most recently started run of any active experiment, else the newest experiment, else None.

    Every experiment is searched, 100 at a time (MLflow's limit for one run search): a new run does not
    change its experiment's ``last_update_time``, so the newest run may be in the oldest experiment.
    """
    client = open_client(tracking_uri, must_exist=False)
    try:
        experiments = all_experiments(client)
        if not experiments:
            return None
        ids = [e.experiment_id for e in experiments]
        runs = [run for batch in search_batches(ids)
                for run in client.search_runs(batch, order_by=["attributes.start_time DESC"], max_results=1)]
    except Exception as exc:  # noqa: BLE001 - any store failure becomes one line naming the store
        reason = foreign_answer(exc) or f"{type(exc).__name__}: {one_line(exc)[:200]}"
        raise TrackingError(f"{tracking_uri}: cannot read runs ({reason})") from exc
    if runs:
        newest = max(runs, key=lambda run: run.info.start_time or 0)
        return Landing(newest.info.experiment_id, newest.info.run_id)
    return Landing(experiments[0].experiment_id)


class LocalUI:
    """``mlflow server`` on a local store, on 127.0.0.1, with no job runner; a context manager.

    The store is served as it is: runs keep their own artifact locations (``./mlruns``
    by default), and the server writes nothing to the working folder.
    """

    def __init__(self, tracking_uri: str, port: int | None = None, start_timeout: float = 60, *, source: str | None = None) -> None:
        if is_server_uri(tracking_uri):
            raise UsageError(f"{tracking_uri} is a tracking server: open it in a browser, `plantml ui` serves local stores")
        check_store_exists(tracking_uri, source)  # serving a missing (or empty) sqlite file would create a store
        self.tracking_uri = tracking_uri
        self.port = port if port is not None else _default_port()
        self.start_timeout = start_timeout
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self._executor: Any = None
        self._log: Any = None

    def command(self) -> list[str]:
        """The ``mlflow server`` command line, without the store's URI: a database store's URI can hold
        its password, and ``ps`` shows command lines to every local user (see :meth:`environment`)."""
        from plantml.stack.host import has_setpriv
        from plantml.stack.mlflow_server import LAUNCHER_PATH  # MLflow's server as one process, as a stack runs it

        artifacts = (Path.cwd() / "mlruns").resolve().as_uri()
        # as the stack's services: the kernel stops the server when plantml dies (kill -9 included)
        pdeathsig = ["setpriv", "--pdeathsig=SIGTERM", "--"] if has_setpriv() else []
        return [*pdeathsig, sys.executable, str(LAUNCHER_PATH), "server", "--default-artifact-root", artifacts, "--no-serve-artifacts",
                "--host", LOOPBACK, "--port", str(self.port), "--workers", "1"]

    def environment(self) -> dict[str, str]:
        """What the server gets in its environment (readable by its owner only): the store's URI among it."""
        return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_TRACKING_URI": "", "PYTHONUNBUFFERED": "1",
                "MLFLOW_BACKEND_STORE_URI": self.tracking_uri}

    def start(self) -> LocalUI:
        """Start the server and wait until ``/health`` answers; a failure names the port and the cause."""
        from mirakuru import HTTPExecutor
        from mirakuru.exceptions import AlreadyRunning, ProcessExitedWithError, TimeoutExpired

        from plantml.stack.ports import port_in_use

        if port_in_use(self.port):
            raise UsageError(f"--port {self.port}: already in use on {LOOPBACK}; choose another with --port")
        env = self.environment()
        # The server's log goes to a temporary file (a pipe nobody reads would fill and block it).
        self._log = tempfile.TemporaryFile(prefix="plantml-ui-")  # noqa: SIM115 - closed in stop()
        self._executor = HTTPExecutor(self.command(), url=f"{self.base_url}/health", method="GET", status=200,
                                      timeout=self.start_timeout, envvars=env, stdout=self._log,
                                      stderr=subprocess.STDOUT, cwd=os.getcwd())
        try:
            self._executor.start()
        except (AlreadyRunning, ProcessExitedWithError, TimeoutExpired) as exc:
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
            self.stop()
            raise TrackingError(f"mlflow server for {self.tracking_uri} on port {self.port} did not start: {tail[0][:300]}") from None
        return self

    def stop(self) -> None:
        """Stop the server and free its port (idempotent)."""
        if self._executor is not None:
            self._executor.stop(expected_returncode=None)
            self._executor = None
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        """True while the server process lives."""
        return self._executor is not None and self._executor.running()

    def __enter__(self) -> LocalUI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _default_port() -> int:
    """MLflow's usual 5000 when it is free, else any free loopback port."""
    import port_for

    from plantml.stack.ports import port_in_use  # something listens there: not what closed connections leave

    return port_for.select_random() if port_in_use(DEFAULT_UI_PORT) else DEFAULT_UI_PORT
