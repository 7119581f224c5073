"""``plantml verify`` against the real stack: eight checks, each read back without plantml.

One verification runs per module; each of the eight tests then checks its own step's
result and reads what that step wrote back through a plain ``MlflowClient`` or boto3.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import pytest
import requests

from plantml.verification import CHECKS, VERIFICATION_TAG, CheckResult, Verification

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


@pytest.fixture(scope="module")
def verified(mlflow_stack: Any) -> tuple[Verification, dict[str, CheckResult]]:
    """One full verification against the stack, and its results by check id."""
    verification = Verification(mlflow_stack.tracking_settings(f"test_verify_{uuid.uuid4().hex[:8]}"))
    results = {result.check.id: result for result in verification.run()}
    return verification, results


@pytest.fixture
def run(verified: tuple[Verification, dict[str, CheckResult]], mlflow_client: Any) -> Any:
    return mlflow_client.get_run(verified[0].run_id)


def read_back_connection(verification: Verification, client: Any, stack: Any) -> None:
    assert requests.get(f"{stack.tracking_uri}/health", timeout=5).status_code == 200


def read_back_experiment(verification: Verification, client: Any, stack: Any) -> None:
    experiment = client.get_experiment_by_name(verification.settings.experiment_name)
    assert experiment.experiment_id == verification.experiment_id
    assert experiment.lifecycle_stage == "active"


def read_back_run_start(verification: Verification, client: Any, stack: Any) -> None:
    run = client.get_run(verification.run_id)
    assert run.info.experiment_id == verification.experiment_id
    assert run.info.run_name == verification.run_name
    assert run.data.tags[VERIFICATION_TAG] == "true"


def read_back_params(verification: Verification, client: Any, stack: Any) -> None:
    params = client.get_run(verification.run_id).data.params
    assert {key: params[key] for key in verification.params} == verification.params


def read_back_metrics(verification: Verification, client: Any, stack: Any) -> None:
    history = sorted(client.get_metric_history(verification.run_id, verification.metric_key), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == list(enumerate(verification.metric_values))


def read_back_artifact(verification: Verification, client: Any, stack: Any) -> None:
    artifact_uri = urlparse(client.get_run(verification.run_id).info.artifact_uri)
    assert artifact_uri.scheme == "s3" and artifact_uri.netloc == stack.bucket
    key = f"{artifact_uri.path.lstrip('/')}/verification/verify_mlflow.txt"
    body = stack.s3_client().get_object(Bucket=stack.bucket, Key=key)["Body"].read().decode()
    assert body == verification.artifact_text


def read_back_tags(verification: Verification, client: Any, stack: Any) -> None:
    tags = client.get_run(verification.run_id).data.tags
    assert {key: tags[key] for key in verification.tags} == verification.tags


def read_back_run_info(verification: Verification, client: Any, stack: Any) -> None:
    info = client.get_run(verification.run_id).info
    assert info.status == "FINISHED"
    assert info.end_time >= info.start_time


READ_BACKS = {
    "connection": read_back_connection,
    "experiment": read_back_experiment,
    "run_start": read_back_run_start,
    "params": read_back_params,
    "metrics": read_back_metrics,
    "artifact": read_back_artifact,
    "tags": read_back_tags,
    "run_info": read_back_run_info,
}


@pytest.mark.parametrize("check", CHECKS, ids=[check.id for check in CHECKS])
def test_check_passes_and_its_write_reads_back(check: Any, verified: Any, mlflow_client: Any, mlflow_stack: Any) -> None:
    verification, results = verified
    assert results[check.id].ok, results[check.id].line
    assert results[check.id].line == f"✓ {check.success}"
    READ_BACKS[check.id](verification, mlflow_client, mlflow_stack)


def plantml(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``plantml`` command line in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "plantml", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_plantml_verify_prints_the_designs_output_against_the_stack(mlflow_stack: Any, mlflow_client: Any, experiment_name: str) -> None:
    env = {**os.environ, **mlflow_stack.client_env(), "PLANTML_VERIFY_EXPERIMENT": experiment_name}
    result = plantml("verify", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == EXPECTED_OUTPUT
    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    runs = mlflow_client.search_runs([experiment.experiment_id], filter_string=f"tags.`{VERIFICATION_TAG}` = 'true'")
    assert [run.info.status for run in runs] == ["FINISHED"]


def test_plantml_verify_against_a_stopped_server_fails_fast_with_exit_1(mlflow_stack: Any, experiment_name: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, **mlflow_stack.client_env()}
    started = time.monotonic()
    result = plantml("verify", "--tracking-uri", uri, "--experiment-name", experiment_name, env=env, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"✗ connection to the MLflow server: {uri} unreachable (connection refused or no route)"]
    assert elapsed < 15


@pytest.mark.local_session
def test_plantml_verify_over_https_to_an_http_server_names_the_tls_failure(mlflow_stack: Any, experiment_name: str) -> None:
    uri = mlflow_stack.tracking_uri.replace("http://", "https://")
    result = plantml("verify", "--tracking-uri", uri, "--experiment-name", experiment_name,
                     env={**os.environ, **mlflow_stack.client_env()}, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"✗ connection to the MLflow server: {uri}: the TLS handshake failed "
                                          "([SSL: WRONG_VERSION_NUMBER] wrong version number; is the server serving https?)"]


def test_plantml_verify_never_writes_into_the_training_experiment(mlflow_stack: Any, mlflow_client: Any, experiment_name: str) -> None:
    env = {**os.environ, **mlflow_stack.client_env(), "MLFLOW_EXPERIMENT_NAME": experiment_name}
    env.pop("PLANTML_VERIFY_EXPERIMENT", None)
    started_ms = int(time.time() * 1000)
    result = plantml("verify", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert mlflow_client.get_experiment_by_name(experiment_name) is None
    verification = mlflow_client.get_experiment_by_name("plantml_verification")
    runs = mlflow_client.search_runs([verification.experiment_id], filter_string=f"attributes.start_time >= {started_ms}")
    assert [run.data.tags[VERIFICATION_TAG] for run in runs] == ["true"]


@pytest.mark.local_session
def test_plantml_verify_without_s3_keys_on_a_direct_stack_names_them_at_the_artifact_check(
        mlflow_stack: Any, mlflow_client: Any, experiment_name: str, tmp_path: Any) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MLFLOW_", "BOTO"))}
    env.update(MLFLOW_TRACKING_URI=mlflow_stack.tracking_uri, PLANTML_VERIFY_EXPERIMENT=experiment_name, HOME=str(tmp_path))
    started = time.monotonic()
    result = plantml("verify", env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[:-1] == EXPECTED_OUTPUT[:5]  # the five checks before it pass
    assert result.stdout.splitlines()[-1].startswith(f"✗ artifact logging: experiment {experiment_name!r} keeps its "
                                                      "artifacts at s3://")
    assert elapsed < 60  # told at once, not after the upload's retries
    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    [run] = mlflow_client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
