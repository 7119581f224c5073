"""Any valid name and value round-trips unchanged through a real server; two trackers keep apart."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plantml.errors import ValidationError
from plantml.tracking import MLflowTracker
from plantml.tracking.validation import MAX_PARAM_VAL_LENGTH, check_name, check_user_tag_name

NAME_ALPHABET = string.ascii_letters + string.digits + "_-. /:"
names = st.text(NAME_ALPHABET + "éß", min_size=1, max_size=250).filter(lambda n: _valid(n))
param_values = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=MAX_PARAM_VAL_LENGTH)
metric_values = st.floats(allow_nan=False, allow_infinity=False, width=64)


def _valid(name: str) -> bool:
    try:
        check_name("param", name)
        check_user_tag_name(name)  # it is a tag's name too: plantml's own are refused (a unit test says so)
    except ValidationError:
        return False
    return True


@pytest.fixture(scope="module")
def tracker(mlflow_stack) -> MLflowTracker:
    return MLflowTracker(tracking_uri=mlflow_stack.tracking_uri, experiment_name="test_tracker_roundtrip")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=names, value=param_values, number=metric_values, step=st.integers(-(2**62), 2**62))
def test_valid_names_and_values_round_trip_unchanged(tracker, mlflow_stack, key, value, number, step) -> None:
    import mlflow

    with tracker.start_run() as run:  # a fresh run per example: a param never changes within a run
        tracker.log_param(key, value)
        tracker.log_metric(key, number, step=step)
        tracker.set_tag(key, value)
    client = mlflow.MlflowClient(tracking_uri=mlflow_stack.tracking_uri)
    data = client.get_run(run.run_id).data
    assert data.params == {key: value}
    assert data.tags[key] == value
    [point] = client.get_metric_history(run.run_id, key)
    assert (point.value, point.step) == (number, step)


def test_two_trackers_on_two_servers_do_not_interfere(mlflow_stack, tmp_path, monkeypatch) -> None:
    """One tracker on the stack (S3 artifacts), one on a local store, interleaved in one process."""
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # a wrong global value to ignore
    remote = MLflowTracker(
        tracking_uri=mlflow_stack.tracking_uri,
        experiment_name="test_two_trackers",
        s3_endpoint=mlflow_stack.s3_endpoint,
        aws_access_key=mlflow_stack.aws_access_key,
        aws_secret_key=mlflow_stack.aws_secret_key,
    )
    local = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'local.db'}", experiment_name="test_two_trackers")
    with remote.start_run(run_name="remote") as remote_run, local.start_run(run_name="local") as local_run:
        remote.log_metric("remote_only", 1.0)
        local.log_metric("local_only", 2.0)
        remote.log_text("to s3", "where.txt")
        local.log_text("to disk", "where.txt")
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9"
    [remote_found] = [r for r in remote.search_runs() if r["run_id"] == remote_run.run_id]
    assert "metrics.local_only" not in remote_found and remote_found["metrics.remote_only"] == 1.0
    assert [r["run_id"] for r in local.search_runs()] == [local_run.run_id]
    key = f"{remote.experiment_id}/{remote_run.run_id}/artifacts/where.txt"
    assert mlflow_stack.s3_client().get_object(Bucket=mlflow_stack.bucket, Key=key)["Body"].read() == b"to s3"
    [local_found] = local.search_runs()
    assert Path(local_found["artifact_uri"], "where.txt").read_text() == "to disk"
