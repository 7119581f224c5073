"""The verification runner and ``plantml verify`` on a local sqlite store and a dead server."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from _tempdir import left_in
from click.testing import CliRunner

from plantml.settings import TrackingSettings
from plantml.verification import ALL_PASSED, CHECKS, VERIFICATION_TAG, Verification

EXPECTED_OUTPUT = [
    "✓ MLflow server is ready!",
    "✓ MLflow tracker initialized",
    "✓ Test run started",
    "✓ Parameters logged",
    "✓ Metrics logged (5 steps)",
    "✓ Artifact logged",
    "✓ Tags set",
    "✓ Run information retrieved",
    "✓ ALL MLFLOW TESTS PASSED",
]


@pytest.fixture
def local_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrackingSettings:
    monkeypatch.chdir(tmp_path)  # artifacts of a sqlite store land in ./mlruns
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = TrackingSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment_name="verify_local")
    client_for(settings).search_experiments()  # the store exists, as after a first training
    return settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_for(settings: TrackingSettings) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.tracking_uri)


def test_all_eight_checks_pass_on_a_local_store(local_settings: TrackingSettings) -> None:
    results = list(Verification(local_settings).run())
    assert [r.check for r in results] == list(CHECKS)
    assert all(r.ok for r in results), [r.line for r in results if not r.ok]


def test_the_checks_leave_nothing_in_the_temporary_folder_and_sweep_what_a_killed_check_left(
    local_settings: TrackingSettings, killed_leftover: Any,
) -> None:
    """The artifact check's file went to a tempfile.TemporaryDirectory, left in /tmp by a kill -9 for good."""
    temp = killed_leftover("plantml-verify")

    assert all(r.ok for r in Verification(local_settings).run())

    assert left_in(temp) == []


def test_the_verification_run_is_tagged_and_finished(local_settings: TrackingSettings) -> None:
    verification = Verification(local_settings)
    list(verification.run())
    run = client_for(local_settings).get_run(verification.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[VERIFICATION_TAG] == "true"


class ParamsTwistingTracker:
    """A real tracker whose params arrive changed, so the params read-back must fail."""

    def __init__(self, settings: TrackingSettings) -> None:
        from plantml.tracking import MLflowTracker

        self.inner = MLflowTracker(tracking_uri=settings.tracking_uri, experiment_name=settings.experiment_name)
        self.experiment_id = self.inner.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.inner.log_params({key: f"{value}-twisted" for key, value in params.items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_failed_read_back_stops_the_checks_and_ends_the_run_failed(local_settings: TrackingSettings) -> None:
    verification = Verification(local_settings, tracker_factory=ParamsTwistingTracker)
    results = list(verification.run())
    assert [r.ok for r in results] == [True, True, True, False]
    assert results[-1].line.startswith("✗ parameters logging: param 'test_param_1' read back as 'value1-twisted'")
    assert client_for(local_settings).get_run(verification.run_id).info.status == "FAILED"


def test_a_server_that_accepts_but_never_answers_fails_the_first_check_after_its_timeout() -> None:
    with socket.socket() as silent:  # the kernel completes the handshake; nothing ever reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        results = list(Verification(TrackingSettings(tracking_uri=uri, experiment_name="nowhere")).run())
        elapsed = time.monotonic() - started
    assert [r.line for r in results] == [f"✗ connection to the MLflow server: {uri} did not answer {uri}/health within 8 s"]
    assert elapsed < 15


def test_a_server_that_is_not_there_fails_the_first_check_fast() -> None:
    settings = TrackingSettings(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment_name="nowhere")
    started = time.monotonic()
    results = list(Verification(settings).run())
    assert time.monotonic() - started < 15
    assert len(results) == 1
    assert results[0].line.startswith(f"✗ connection to the MLflow server: {settings.tracking_uri} unreachable")


def invoke_verify(*args: str) -> Any:
    """``plantml verify ARGS`` in-process, with the environment it sets restored afterwards."""
    from plantml.cli import cli
    from plantml.cli.verify import QUICK_HTTP_ENV

    runner = CliRunner(env={name: os.environ.get(name) for name in QUICK_HTTP_ENV})
    return runner.invoke(cli, ["verify", *args])


def test_plantml_verify_prints_the_designs_lines_and_exits_0(local_settings: TrackingSettings) -> None:
    result = invoke_verify("--tracking-uri", local_settings.tracking_uri, "--experiment-name", "verify_cli")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == EXPECTED_OUTPUT
    assert result.stdout.splitlines()[-1] == ALL_PASSED


def test_plantml_verify_against_a_dead_server_exits_1_with_the_cross_line() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = invoke_verify("--tracking-uri", uri)
    assert time.monotonic() - started < 15
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [f"✗ connection to the MLflow server: {uri} unreachable (connection refused or no route)"]


def test_an_artifact_that_cannot_be_stored_is_named_and_does_not_hold_the_verification(
        local_settings: TrackingSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from plantml.verification import runner

    monkeypatch.setenv("PLANTML_JOURNAL_DIR", str(tmp_path / "journal"))  # the undelivered artifact's journal stays here

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("SignatureDoesNotMatch: check your key")

    monkeypatch.setattr(runner, "DELIVERY_TIMEOUT", 2.0)
    monkeypatch.setattr(MlflowClient, "log_artifact", refuse)
    verification = Verification(local_settings)
    started = time.monotonic()
    results = list(verification.run())
    assert time.monotonic() - started < 15  # not the tracker's 60 s wait for an upload that keeps failing
    assert results[-1].line.startswith("✗ artifact logging: not delivered to the server within 2 s; last try: ")
    assert "SignatureDoesNotMatch: check your key" in results[-1].line
    assert client_for(local_settings).get_run(verification.run_id).info.status == "FAILED"


@pytest.mark.parametrize("empty", [False, True], ids=["missing", "empty"])
def test_plantml_verify_refuses_a_sqlite_store_that_is_not_there_rather_than_creating_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty: bool) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if empty:
        (tmp_path / "mlflow.db").touch()
    result = invoke_verify()
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"✗ connection to the MLflow server: tracking URI 'sqlite:///mlflow.db' (the default): no MLflow store at "
        f"{tmp_path / 'mlflow.db'} (train first, or give another tracking URI)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["mlflow.db"] if empty else [])
    assert not empty or (tmp_path / "mlflow.db").stat().st_size == 0


def test_the_password_of_a_tracking_uri_never_shows_in_a_cross_line() -> None:
    uri = f"http://admin:s3cret-pw@127.0.0.1:{free_port()}"
    result = invoke_verify("--tracking-uri", uri)
    assert result.exit_code == 1
    assert "s3cret-pw" not in result.output
    assert result.stdout.splitlines() == [
        f"✗ connection to the MLflow server: {uri.replace('s3cret-pw', '***')} unreachable (connection refused or no route)"]
