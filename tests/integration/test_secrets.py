"""Secrets stay secret: nothing a full training run leaves behind holds the S3 secret or the database password."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _secrets(stack) -> dict[str, str]:
    if stack.backend != "external":  # every secret of a stack plantml started: passwords, keys, JWT keys
        return stack.secrets()
    found = {"s3 secret": stack.aws_secret_key}
    database_uri = stack.endpoints.database_uri
    if database_uri:
        found["database password"] = re.search(r"://[^:/@]+:([^@]+)@", database_uri).group(1)
    return found


def _leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value and value in text]


@pytest.fixture(scope="module")
def trained(mlflow_stack, tmp_path_factory):
    """One real training run through the command line, with everything it printed."""
    workdir = tmp_path_factory.mktemp("secrets")
    env = {**os.environ, **mlflow_stack.client_env(), "PLANTML_CACHE_DIR": str(workdir / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "plantml", "train", "--epochs", "1", "--image-size", "16", "--batch-size", "64",
         "--experiment-name", "secrets_scan", "--registered-model-name", "secrets_scan_model"],
        env=env, cwd=workdir, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"run ([0-9a-f]{32})", result.stdout).group(1)
    return {"run_id": run_id, "output": result.stdout + result.stderr, "workdir": workdir}


def test_the_cli_output_holds_no_secret(trained, mlflow_stack):
    assert _leaks(trained["output"], _secrets(mlflow_stack)) == []


def test_params_tags_and_metric_names_hold_no_secret(trained, mlflow_stack, mlflow_client):
    run = mlflow_client.get_run(trained["run_id"])
    recorded = " ".join([*run.data.params, *run.data.params.values(), *run.data.tags, *run.data.tags.values(),
                         *run.data.metrics])
    assert len(run.data.params) >= 17  # the scan looked at a real run
    assert _leaks(recorded, _secrets(mlflow_stack)) == []


def test_no_artifact_holds_a_secret(trained, mlflow_stack, mlflow_env, tmp_path):
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(run_id=trained["run_id"], dst_path=str(tmp_path),
                                                     tracking_uri=mlflow_stack.tracking_uri))
    files = [path for path in local.rglob("*") if path.is_file()]
    assert any(path.name == "training_history.json" for path in files)
    secrets = {name: value.encode() for name, value in _secrets(mlflow_stack).items()}
    leaking = [(str(path), name) for path in files for name, value in secrets.items() if value in path.read_bytes()]
    assert leaking == []


def test_the_services_logs_hold_no_secret(trained, mlflow_stack):
    if mlflow_stack.backend == "external":
        pytest.skip("an external stack's service logs are not plantml's to read")
    logs = mlflow_stack.service_logs()
    if not logs:
        pytest.fail(f"the {mlflow_stack.backend} stack exposes no service logs to scan")
    text = "\n".join(logs.values())
    assert "mlflow" in text.lower()  # the scan read real logs
    assert _leaks(text, _secrets(mlflow_stack)) == []


def test_reprs_of_the_stack_and_a_tracker_hold_no_secret(mlflow_stack, mlflow_env):
    from plantml.tracking import MLflowTracker

    tracker = MLflowTracker(experiment_name="secrets_scan")
    shown = " ".join([repr(mlflow_stack), repr(mlflow_stack.endpoints), repr(tracker), repr(tracker.settings), str(mlflow_stack)])
    assert _leaks(shown, _secrets(mlflow_stack)) == []
