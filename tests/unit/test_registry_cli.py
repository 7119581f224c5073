"""``plantml registry`` on a local sqlite store: aligned tables, one-line errors."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from plantml.cli.registry import QUICK_HTTP_ENV


@pytest.fixture(scope="module")
def store_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry_cli")


@pytest.fixture
def store(store_folder: Path) -> tuple[str, str]:
    """A fresh model of two versions in a module-wide sqlite store; returns (uri, model name)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store_folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = f"plants_{uuid.uuid4().hex[:6]}"
    experiment_id = client.create_experiment(name, artifact_location=str(store_folder / name))
    client.create_registered_model(name)
    for lr in ("0.1", "0.05"):
        run = client.create_run(experiment_id)
        client.log_param(run.info.run_id, "lr", lr)
        client.log_metric(run.info.run_id, "val_accuracy", 0.5 + float(lr))
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return uri, name


def registry_cli(uri: str, *args: str) -> Any:
    from plantml.cli import cli

    runner = CliRunner(env={name: os.environ.get(name) for name in QUICK_HTTP_ENV})
    return runner.invoke(cli, ["registry", "--tracking-uri", uri, *args])


def test_list_shows_every_version_with_its_stage_and_aliases(store: tuple[str, str]) -> None:
    uri, name = store
    registry_cli(uri, "promote", name, "2", "--alias", "Staging")
    result = registry_cli(uri, "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "STAGE", "ALIASES", "RUN", "CREATED"]
    rows = [line.split()[:4] for line in lines[1:] if line.startswith(name + " ")]
    assert rows == [[name, "1", "None", "-"], [name, "2", "Staging", "staging"]]


def test_list_name_shows_versions_stages_runs_and_metrics(store: tuple[str, str]) -> None:
    uri, name = store
    registry_cli(uri, "promote", name, "1")
    lines = registry_cli(uri, "list", name).stdout.splitlines()
    assert lines[0].split() == ["VERSION", "STAGE", "ALIASES", "RUN", "STATUS", "CREATED", "METRICS"]
    assert lines[1].split()[:3] == ["1", "Production", "production"] and lines[1].endswith("val_accuracy=0.6")


def test_promote_then_rollback_report_each_move(store: tuple[str, str]) -> None:
    uri, name = store
    assert registry_cli(uri, "promote", name, "1").stdout.strip() == f"{name}: alias 'production' -> version 1 (was unset)"
    assert registry_cli(uri, "promote", name, "2", "--alias", "Production").stdout.strip() == f"{name}: alias 'production' -> version 2 (was version 1)"
    result = registry_cli(uri, "rollback", name)
    assert result.stdout.strip() == f"{name}: alias 'production' rolled back to version 1 (was version 2)"


def test_compare_marks_the_keys_that_differ(store: tuple[str, str]) -> None:
    uri, name = store
    lines = registry_cli(uri, "compare", name, "1", "2").stdout.splitlines()
    assert lines[0] == "params:"
    assert lines[2].split() == ["*", "lr", "0.1", "0.05"]
    assert "metrics:" in lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("promote", "{name}", "1", "--alias", "latest"), "alias 'latest'"),
        (("promote", "{name}", "7"), "version 7: not found"),
        (("rollback", "{name}", "--alias", "canary"), "alias 'canary': not set"),
        (("list", "ghost_model"), "registered model 'ghost_model': not found"),
    ],
    ids=["reserved-alias", "unknown-version", "unknown-alias", "unknown-model"],
)
def test_errors_are_one_line_naming_the_culprit_with_exit_2(
    store: tuple[str, str], args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from plantml.cli import main

    uri, name = store
    with pytest.MonkeyPatch.context() as patch:
        for key in QUICK_HTTP_ENV:
            patch.delenv(key, raising=False)
        code = main(["registry", "--tracking-uri", uri, *(a.format(name=name) for a in args)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plantml: error: ") and message in err and "\n" not in err
