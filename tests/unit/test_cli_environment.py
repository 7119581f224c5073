"""A command run from Python (``plantml.cli.main([...])``: a notebook, a test suite) leaves its caller's
environment as it found it: its quicker HTTP settings and the stack's S3 credentials from ``.env`` stayed
behind and changed the caller's later MLflow calls (fewer retries, another object store's keys)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plantml.cli import main

STACK_ENV = {"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "plantml-key",
             "AWS_SECRET_ACCESS_KEY": "plantml-secret"}
SET_BY_COMMANDS = {*STACK_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                   "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a store and a stack's .env, none of the commands' variables set beforehand."""
    import mlflow

    for name in {*SET_BY_COMMANDS, "MLFLOW_TRACKING_URI"}:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PLANTML_JOURNAL_DIR", str(tmp_path / "journal"))
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("plant_classification")
    (tmp_path / ".env").write_text(f"MLFLOW_TRACKING_URI={uri}\n" + "".join(f"{k}={v}\n" for k, v in STACK_ENV.items()))
    return tmp_path


@pytest.mark.parametrize("argv, status", [
    (["registry", "list"], 0),
    (["tracking", "recover"], 0),
    (["verify", "--tracking-uri", "http://127.0.0.1:9"], 1),  # nothing listens: the first check fails
    (["ui", "--tracking-uri", "sqlite:///absent.db"], 2),  # refused once its settings were in place
], ids=lambda value: value[0] if isinstance(value, list) else None)
def test_a_command_run_from_python_leaves_its_callers_environment_as_it_was(here: Path, argv: list[str], status: int,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    before = dict(os.environ)

    assert main(argv) == status, capsys.readouterr()

    assert dict(os.environ) == before


def test_the_users_own_values_win_during_the_command_and_stay_after(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from plantml.tracking.environ import command_environ

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    with command_environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"},
                         {"AWS_ACCESS_KEY_ID": "k"}):
        assert (os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"],
                os.environ["AWS_ACCESS_KEY_ID"]) == ("7", "30", "k")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ and "AWS_ACCESS_KEY_ID" not in os.environ


@pytest.fixture
def leaves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from plantml.training import synth

    return synth.write_set(tmp_path_factory.mktemp("leaves") / "leaves", synth.SynthSpec(per_class=6, size=16))


def _warning_state() -> tuple:
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("plantml.training", "plantml.tracking")]
    return list(warnings.filters), warnings.showwarning, [(list(log.handlers), log.propagate) for log in loggers]


@pytest.mark.parametrize("command", ["train", "data inspect"])
def test_a_command_run_from_python_leaves_its_callers_warning_filters_and_loggers_as_they_were(
        here: Path, leaves: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``train`` and ``data`` added two ignore filters to the caller's warnings and took over plantml's loggers
    (their own stderr handler, no propagation) for good: a notebook's later warnings went missing."""
    argv = {"train": ["train", "--data-dir", str(leaves), "--backbone", "mobilenet_v2", "--weights", "none",
                      "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--no-mlflow"],
            "data inspect": ["data", "inspect", str(leaves)]}[command]
    import plantml.training.figures
    import plantml.training.run  # noqa: F401 - what they add to the filters when imported is theirs, not the command's

    before = _warning_state()

    assert main(argv) == 0, capsys.readouterr()

    assert _warning_state() == before
