"""Settings resolution of MLflowTracker: argument, then environment, then .env, then the default."""

from __future__ import annotations

import socket
import time

import pytest

from plantml.errors import TrackingError
from plantml.settings import DEFAULT_EXPERIMENT_NAME, DEFAULT_TRACKING_URI
from plantml.tracking import MLflowTracker, connection

ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No environment, an empty working folder, and no contact with any store."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLANTML_JOURNAL_DIR", str(tmp_path / "journal"))
    monkeypatch.setattr(connection, "connect", lambda settings, timeout: (object(), "1"))


def test_default_is_local_sqlite_and_plant_classification(offline) -> None:
    tracker = MLflowTracker()
    assert tracker.tracking_uri == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert tracker.experiment_name == DEFAULT_EXPERIMENT_NAME
    assert tracker.settings.s3_endpoint is None


def test_env_file_beats_the_default(offline, tmp_path) -> None:
    (tmp_path / ".env").write_text("MLFLOW_TRACKING_URI=http://127.0.0.1:5999\nMLFLOW_EXPERIMENT_NAME=from_file\n")
    tracker = MLflowTracker()
    assert (tracker.tracking_uri, tracker.experiment_name) == ("http://127.0.0.1:5999", "from_file")


def test_environment_beats_the_env_file(offline, tmp_path, monkeypatch) -> None:
    (tmp_path / ".env").write_text("MLFLOW_EXPERIMENT_NAME=from_file\nAWS_ACCESS_KEY_ID=file_key\n")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from_env")
    tracker = MLflowTracker()
    assert tracker.experiment_name == "from_env"
    assert tracker.settings.aws_access_key == "file_key"


def test_argument_beats_everything(offline, tmp_path, monkeypatch) -> None:
    (tmp_path / ".env").write_text("MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:1\n")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env_secret")
    tracker = MLflowTracker(s3_endpoint="http://127.0.0.1:3", aws_secret_key="arg_secret")
    assert tracker.settings.s3_endpoint == "http://127.0.0.1:3"
    assert tracker.settings.aws_secret_key == "arg_secret"
    assert "arg_secret" not in repr(tracker.settings)


def test_constructor_takes_the_design_arguments_in_order(offline) -> None:
    tracker = MLflowTracker("http://127.0.0.1:5001", "plants", "http://127.0.0.1:9000", "key", "secret")
    settings = tracker.settings
    assert (settings.tracking_uri, settings.experiment_name, settings.s3_endpoint) == (
        "http://127.0.0.1:5001", "plants", "http://127.0.0.1:9000")
    assert (settings.aws_access_key, settings.aws_secret_key) == ("key", "secret")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dead_server_fails_fast_naming_the_uri(monkeypatch, tmp_path) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"{uri}: tracking server not reachable"):
        MLflowTracker(tracking_uri=uri, connect_timeout=1.0)
    assert time.monotonic() - started < 15


def test_a_dead_server_from_a_stale_env_file_says_so(monkeypatch, tmp_path) -> None:
    """The case of a .env left by a stopped `plantml stack up`: the error names the file's folder."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_free_port()}"
    (tmp_path / ".env").write_text(f"MLFLOW_TRACKING_URI={uri}\n")
    with pytest.raises(TrackingError, match=rf"not reachable .*this URI came from MLFLOW_TRACKING_URI in \.env in {tmp_path}"):
        MLflowTracker(connect_timeout=1.0)


def test_a_password_in_the_tracking_uri_never_shows_in_a_repr_or_an_error(monkeypatch, tmp_path) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"http://admin:hunter2@127.0.0.1:{_free_port()}"
    with pytest.raises(TrackingError, match="http://admin:\\*\\*\\*@127.0.0.1:.*: tracking server not reachable") as refused:
        MLflowTracker(tracking_uri=uri, connect_timeout=1.0)
    monkeypatch.setattr(connection, "connect", lambda settings, timeout: (object(), "1"))
    tracker = MLflowTracker(tracking_uri=uri, journal_dir=tmp_path / "journal")
    assert tracker.tracking_uri == uri  # what the client uses keeps it
    assert "hunter2" not in str(refused.value) + repr(tracker) + repr(tracker.settings)


OPEN_AFTER_GO = """
import sys, time
from pathlib import Path
import mlflow  # imported before the start line: the processes then race for the store itself
from plantml.tracking.stores import open_client
print("ready", flush=True)
while not Path("go").exists():
    time.sleep(0.01)
client = open_client("sqlite:///mlflow.db", must_exist=False)
print(client.search_experiments()[0].name)
"""


def test_processes_creating_one_sqlite_store_at_once_all_open_it(tmp_path):
    """A sweep started in a new folder (`for lr in ...; do plantml train ... & done`): MLflow's migrations run once."""
    import subprocess
    import sys

    processes = [subprocess.Popen([sys.executable, "-c", OPEN_AFTER_GO], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    assert [process.stdout.readline().strip() for process in processes] == ["ready"] * 3  # all imported, all waiting
    (tmp_path / "go").touch()
    results = [(process.wait(timeout=120), *process.communicate()) for process in processes]
    assert [(code, out.strip()) for code, out, _ in results] == [(0, "Default")] * 3, [err[-300:] for *_, err in results]
