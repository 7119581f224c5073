"""``plantml stack up --auth`` (both backends): MLflow's basic-auth app; the tracker authenticates, anonymous writes are refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import requests
from _processes import stop


def _create_experiment(stack, name: str, auth=None) -> int:
    return requests.post(f"{stack.tracking_uri}/api/2.0/mlflow/experiments/create", json={"name": name},
                         auth=auth, timeout=10).status_code


def test_an_anonymous_write_is_refused(auth_stack):
    assert _create_experiment(auth_stack, "anonymous") == 401


def test_a_wrong_password_is_refused(auth_stack):
    assert _create_experiment(auth_stack, "wrong_password", auth=(auth_stack.endpoints.username, "not-it")) == 401


def test_the_tracker_authenticates_with_the_tracking_username_and_password(auth_stack, monkeypatch, experiment_name):
    import mlflow

    from plantml.tracking import MLflowTracker

    for name, value in auth_stack.client_env().items():
        monkeypatch.setenv(name, value)
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(auth_stack.client_env())
    tracker = MLflowTracker(experiment_name=experiment_name)
    with tracker.start_run(run_name="authenticated") as run:
        tracker.log_params({"backbone": "resnet18"})
        tracker.log_metrics({"val_accuracy": 0.9}, step=1)
    stored = mlflow.MlflowClient(auth_stack.tracking_uri).get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"backbone": "resnet18"} and stored.data.metrics == {"val_accuracy": 0.9}


def test_the_admin_password_never_shows_in_a_repr(auth_stack):
    shown = repr(auth_stack) + repr(auth_stack.endpoints)
    assert auth_stack.endpoints.password not in shown


def test_stack_up_auth_exports_the_tracking_user(tmp_path, pytestconfig):
    env_file = tmp_path / "auth.env"
    up = subprocess.Popen([sys.executable, "-m", "plantml", "stack", "up", "--auth", "--env-file", str(env_file),
                           "--backend", pytestconfig.getoption("--stack")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in up.stdout:
            if line.startswith("Press Ctrl-C"):
                break
        values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if not line.startswith("#"))
        mode = os.stat(env_file).st_mode
        uri = values["MLFLOW_TRACKING_URI"]
        anonymous = requests.post(f"{uri}/api/2.0/mlflow/experiments/create", json={"name": "a"}, timeout=10)
        authenticated = requests.post(f"{uri}/api/2.0/mlflow/experiments/create", json={"name": "b"}, timeout=10,
                                      auth=(values["MLFLOW_TRACKING_USERNAME"], values["MLFLOW_TRACKING_PASSWORD"]))
    finally:
        stop(up)
    assert (anonymous.status_code, authenticated.status_code) == (401, 200)
    assert re.match(r"http://127\.0\.0\.1:\d+$", uri)
    assert mode & 0o077 == 0  # the file holds secrets: owner only
    assert not env_file.exists()  # removed at stop: it would point plantml at a dead server


def test_two_stacks_in_one_process_each_get_their_own_s3_keys(auth_stack, mlflow_stack, monkeypatch, experiment_name):
    """boto3 caches the first credentials it reads: a second stack must not be sent the first one's keys."""
    from plantml.tracking import MLflowTracker

    for stack in (mlflow_stack, auth_stack, mlflow_stack):
        for name, value in stack.client_env().items():
            monkeypatch.setenv(name, value)
        tracker = MLflowTracker(experiment_name=experiment_name)
        with tracker.start_run() as run:
            tracker.log_text("leaf", "note.txt")
        keys = [item["Key"] for item in stack.s3_client().list_objects_v2(Bucket=stack.bucket).get("Contents", [])]
        assert any(key.endswith(f"{run.run_id}/artifacts/note.txt") for key in keys)


def test_the_tracker_reads_the_tracking_user_from_the_env_file_like_the_command_line(auth_stack, tmp_path, monkeypatch,
                                                                                     experiment_name):
    """A notebook in the folder of ``stack up --auth``'s ``.env`` authenticates as ``plantml train`` there does."""
    from plantml.tracking import MLflowTracker

    lines = [f"{name}={value}" for name, value in auth_stack.client_env().items()]
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")
    for name in [*auth_stack.client_env(), "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]:
        monkeypatch.setenv(name, "")  # recorded, so the test's end removes what the tracker copies in
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    tracker = MLflowTracker(experiment_name=experiment_name)
    with tracker.start_run(run_name="authenticated_from_env_file") as run:
        tracker.log_metrics({"val_accuracy": 0.9}, step=1)
    stored = requests.get(f"{auth_stack.tracking_uri}/api/2.0/mlflow/runs/get", params={"run_id": run.run_id},
                          auth=(auth_stack.endpoints.username, auth_stack.endpoints.password), timeout=10).json()
    assert stored["run"]["info"]["status"] == "FINISHED"
