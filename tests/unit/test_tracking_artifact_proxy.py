"""Before a training: an experiment whose artifacts go through a server that serves none is one line, not minutes of 503s."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from plantml.errors import ConfigError
from plantml.settings import TrackingSettings
from plantml.tracking.connection import check_artifact_access


def server(artifacts_status: int) -> Iterator[str]:
    """A loopback HTTP server whose mlflow-artifacts endpoint answers ``artifacts_status`` (503: --no-serve-artifacts)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            status = artifacts_status if self.path.startswith("/api/2.0/mlflow-artifacts/") else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def no_artifact_serving() -> Iterator[str]:
    yield from server(503)


@pytest.fixture
def artifact_serving() -> Iterator[str]:
    yield from server(200)


def client_with_location(location: str) -> SimpleNamespace:
    return SimpleNamespace(get_experiment=lambda experiment_id: SimpleNamespace(artifact_location=location))


def test_a_proxied_experiment_on_a_server_serving_no_artifacts_is_one_line_before_training(no_artifact_serving) -> None:
    settings = TrackingSettings(tracking_uri=no_artifact_serving, experiment_name="plants")
    with pytest.raises(ConfigError, match="mlflow-artifacts:/1.*serves no artifacts.*--artifacts proxied"):
        check_artifact_access(client_with_location("mlflow-artifacts:/1"), "1", settings)


def test_a_proxied_experiment_on_a_server_serving_artifacts_passes(artifact_serving) -> None:
    settings = TrackingSettings(tracking_uri=artifact_serving, experiment_name="plants")
    check_artifact_access(client_with_location("mlflow-artifacts:/1"), "1", settings)


def test_a_model_kept_through_a_server_serving_no_artifacts_is_one_line_naming_the_fix(no_artifact_serving) -> None:
    """Was MLflow's own "… Caused by ResponseError('too many 503 error responses')" after its retries."""
    from plantml.errors import RegistryError
    from plantml.registry.loading import downloaded_version

    client = SimpleNamespace(get_model_version_download_uri=lambda name, version: "mlflow-artifacts:/1/models/m-1/artifacts")
    with pytest.raises(RegistryError, match=r"^model 'plants' version 1: its files are kept through the tracking server "
                                           r"\(mlflow-artifacts:/1/models/m-1/artifacts\), and .* serves no artifacts .*"
                                           r"--artifacts proxied to load it$"):
        with downloaded_version(client, no_artifact_serving, "plants", 1):
            pass


def test_the_keys_are_asked_of_an_s3_endpoint_only_never_of_aws_itself(monkeypatch) -> None:
    """The key check before a training lists one key at MLFLOW_S3_ENDPOINT_URL; without one (AWS) no request is made."""
    from plantml.stack import endpoints
    from plantml.tracking.connection import check_object_store_keys

    asked: list[str] = []

    def make_s3_client(endpoint: str, *args: object, **kwargs: object) -> SimpleNamespace:
        asked.append(endpoint)
        return SimpleNamespace(list_objects_v2=lambda **kw: asked.append(f"list {kw['Bucket']}/{kw['Prefix']} {kw['MaxKeys']}"))

    monkeypatch.setattr(endpoints, "make_s3_client", make_s3_client)
    keys = {"aws_access_key": "key", "aws_secret_key": "secret"}
    check_object_store_keys(TrackingSettings(tracking_uri="http://127.0.0.1:1", **keys), "s3://bucket/1")
    assert asked == []
    check_object_store_keys(TrackingSettings(tracking_uri="http://127.0.0.1:1", s3_endpoint="http://127.0.0.1:2", **keys),
                            "s3://bucket/1")
    assert asked == ["http://127.0.0.1:2", "list bucket/1 1"]
