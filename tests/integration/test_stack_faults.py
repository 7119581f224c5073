"""Fault controls: one service of a stack stopped, started and restarted, its data kept."""

from __future__ import annotations

import pytest
import requests
from botocore.exceptions import BotoCoreError, ClientError

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
