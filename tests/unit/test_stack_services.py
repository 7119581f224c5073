"""The stack's service descriptions and endpoints, without starting anything."""

from __future__ import annotations

import pytest

from plantml.errors import ConfigError
from plantml.stack import MLflowServerSpec, PostgresSpec, S3Spec, StackEndpoints


def test_the_backend_uri_names_psycopg2_explicitly():
    uri = PostgresSpec(password="pw").sqlalchemy_uri("127.0.0.1", 5432)
    assert uri == "postgresql+psycopg2://mlflow:pw@127.0.0.1:5432/mlflow"


def test_direct_mode_is_the_designs_default_artifact_root():
    args = MLflowServerSpec("direct").server_args("db", "mlflow", "127.0.0.1", 5001)
    assert args[args.index("--default-artifact-root") + 1] == "s3://mlflow/"
    assert "--artifacts-destination" not in args


def test_proxied_mode_serves_artifacts_through_the_server():
    args = MLflowServerSpec("proxied").server_args("db", "mlflow", "127.0.0.1", 5001)
    assert args[args.index("--artifacts-destination") + 1] == "s3://mlflow"
    assert "--default-artifact-root" not in args


def test_the_server_runs_one_worker_with_the_job_runner_off():
    spec = MLflowServerSpec()
    args = spec.server_args("db", "b", "h", 1)
    assert args[args.index("--workers") + 1] == "1"
    assert spec.server_env("http://s3", S3Spec())["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_an_unknown_artifact_mode_is_refused_naming_it():
    with pytest.raises(ConfigError, match="'mirror'"):
        MLflowServerSpec("mirror")  # type: ignore[arg-type]


def test_an_empty_s3_secret_is_refused():
    with pytest.raises(ConfigError, match="s3"):
        S3Spec(secret_key="")


def test_every_stack_gets_fresh_credentials():
    assert S3Spec().secret_key != S3Spec().secret_key
    assert PostgresSpec().password != PostgresSpec().password


def test_endpoints_mask_the_s3_secret_and_the_database_password():
    endpoints = StackEndpoints("http://127.0.0.1:1", "http://127.0.0.1:2", "key", "s3-secret-xyz",
                               database_uri="postgresql+psycopg2://mlflow:db-pass-xyz@127.0.0.1:3/mlflow")
    shown = repr(endpoints)
    assert "s3-secret-xyz" not in shown and "db-pass-xyz" not in shown
    assert "mlflow:***@" in shown


def test_client_env_holds_exactly_the_four_client_variables():
    endpoints = StackEndpoints("http://127.0.0.1:1", "http://127.0.0.1:2", "key", "secret")
    assert endpoints.client_env() == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:1",
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:2",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
