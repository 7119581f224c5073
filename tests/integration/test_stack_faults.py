"""Fault controls and crashes: one service of a stack stopped, restarted or killed, its data kept."""

from __future__ import annotations

import time
import uuid

import psutil
import pytest
import requests
from botocore.exceptions import BotoCoreError, ClientError
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from plantml.errors import ConfigError


@pytest.fixture(scope="module")
def own_stack(private_mlflow_stack):
    """A stack of this module's own (the session's backend): these tests break services on purpose."""
    return private_mlflow_stack


def test_a_restarted_mlflow_server_keeps_its_runs(own_stack):
    import mlflow

    client = mlflow.MlflowClient(own_stack.tracking_uri)
    experiment_id = client.create_experiment("survives_restart")
    own_stack.restart("mlflow")
    assert client.get_experiment(experiment_id).name == "survives_restart"


def test_a_stopped_s3_refuses_then_serves_the_same_objects_once_started(own_stack):
    s3 = own_stack.s3_client(retries={"max_attempts": 1}, connect_timeout=1)
    s3.put_object(Bucket=own_stack.bucket, Key="kept.txt", Body=b"leaf")
    own_stack.stop("s3")
    with pytest.raises((BotoCoreError, ClientError)):
        s3.get_object(Bucket=own_stack.bucket, Key="kept.txt")
    own_stack.start("s3")
    assert s3.get_object(Bucket=own_stack.bucket, Key="kept.txt")["Body"].read() == b"leaf"


def test_mlflow_answers_again_after_postgres_restarts(own_stack):
    import mlflow

    own_stack.restart("postgres")
    client = mlflow.MlflowClient(own_stack.tracking_uri)
    assert client.create_experiment("after_pg_restart")
    assert requests.get(f"{own_stack.tracking_uri}/health", timeout=5).status_code == 200


def test_an_unknown_service_name_is_refused_naming_it(own_stack):
    with pytest.raises(ConfigError, match="'redis'"):
        own_stack.stop("redis")


def kill_postgres_after_acknowledged_writes(stack, writes: int = 300) -> list[tuple[int, float]]:
    """What the OOM killer does: one PostgreSQL backend killed right after ``writes`` acknowledged writes, then
    the postmaster; once the stack brought PostgreSQL back, the (step, value) points the server still has."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(stack.tracking_uri)
    run_id = client.create_run(client.create_experiment(f"durable_{uuid.uuid4().hex[:8]}")).info.run_id
    postgres = stack.services["postgres"]
    postmaster = psutil.Process(postgres.process.pid)
    backends = [child for child in postmaster.children() if "mlflow mlflow" in " ".join(child.cmdline())]
    assert backends, [child.cmdline() for child in postmaster.children()]  # MLflow's open connections
    now = int(time.time() * 1000)
    for step in range(writes):  # each call answered 200 before the next: acknowledged writes
        client.log_batch(run_id, metrics=[Metric("loss", 1 / (step + 1), now + step, step)])

    # At once: without synchronous commit, PostgreSQL's WAL writer flushes the last commits within 200 ms
    # (wal_writer_delay), so the control sees its loss only when the kill comes sooner (found them before the writes)
    backends[0].kill()
    assert backends[0].wait(timeout=10) is not None or not backends[0].is_running()
    postmaster.kill()
    postmaster.wait(timeout=10)
    assert not postmaster.is_running()  # both faults really happened

    # The stack brings it back: a new postmaster that accepts logins (crash recovery done).
    eventually(lambda: postgres.process.pid not in (None, postmaster.pid) and postgres.spec.ready())
    client.set_terminated(run_id)
    assert client.get_run(run_id).info.status == "FINISHED"
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


def test_acknowledged_writes_survive_a_killed_backend_then_a_killed_postmaster(own_stack):
    assert own_stack.spec.postgres.durable
    assert kill_postgres_after_acknowledged_writes(own_stack) == [(step, 1 / (step + 1)) for step in range(300)]


def test_the_same_kills_lose_acknowledged_writes_on_a_fast_stack(mlflow_stack_factory):
    """The control: without synchronous commit the test above sees a loss (5 of 300 points in each run measured)."""
    stack = mlflow_stack_factory(durable=False).start()
    try:
        stored = kill_postgres_after_acknowledged_writes(stack)
    finally:
        stack.stop()
    assert 0 < 300 - len(stored) < 300


@retry(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(90), wait=wait_fixed(0.2), reraise=True)
def eventually(condition) -> bool:
    return condition()
