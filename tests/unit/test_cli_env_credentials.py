"""``plantml stack up --auth --env-file .env``, then any plantml command in that folder: it authenticates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from plantml.settings import CREDENTIAL_VARIABLES


@pytest.fixture
def in_folder_with_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in (*CREDENTIAL_VARIABLES, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text("MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=from-dot-env\n")
    return tmp_path


def credentials_seen_by(*args: str) -> dict[str, str | None]:
    """The MLflow credentials a plantml command (here ``--help``, which talks to no server) leaves in the environment."""
    from plantml.cli import cli

    before = {name: os.environ.get(name) for name in CREDENTIAL_VARIABLES}
    try:
        result = CliRunner().invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, result.output
        return {name: os.environ.get(name) for name in CREDENTIAL_VARIABLES}
    finally:
        for name, value in before.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def test_the_mlflow_user_and_password_come_from_dot_env(in_folder_with_env: Path) -> None:
    assert credentials_seen_by("verify") == {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "from-dot-env",
                                             "MLFLOW_TRACKING_TOKEN": None}


def test_the_mlflow_token_comes_from_dot_env(in_folder_with_env: Path) -> None:
    (in_folder_with_env / ".env").write_text("MLFLOW_TRACKING_URI=https://mlflow.example/mlflow\nMLFLOW_TRACKING_TOKEN=from-dot-env\n")
    assert credentials_seen_by("train")["MLFLOW_TRACKING_TOKEN"] == "from-dot-env"


def test_the_environment_wins_over_dot_env(in_folder_with_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-environment")
    assert credentials_seen_by("registry")["MLFLOW_TRACKING_PASSWORD"] == "from-environment"


def test_stack_commands_leave_the_environment_alone(in_folder_with_env: Path) -> None:
    assert credentials_seen_by("stack") == dict.fromkeys(CREDENTIAL_VARIABLES)
