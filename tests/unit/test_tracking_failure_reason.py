"""A delivery try refused by a certificate names what gets past it, for the server whose certificate it was.

One TLS server on 127.0.0.1 with a certificate of a throwaway CA stands for both an object store and a tracking
server; real clients fail their handshake with it (botocore as MLflow's artifact client does, requests as plantml's
own deliveries do), and the sender's one line for each failed try (``last_error``, what ``DeliveryPending`` and
``tracking recover`` print) must name that server's setting: before, botocore's text alone named neither.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import requests
from botocore.config import Config

from plantml.settings import TrackingSettings
from plantml.stack.tls import make_mutual_tls
from plantml.tracking.transport import Transport


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[str]:
    """``https://127.0.0.1:PORT``: completes no handshake with a client that does not trust its CA."""
    tls = make_mutual_tls("plantml-test-reason")
    (tmp_path / "cert.pem").write_bytes(tls.cert)
    (tmp_path / "key.pem").write_bytes(tls.key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):  # the client refused the certificate, as the test wants
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def s3_failure(endpoint: str) -> BaseException:
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=5))
    with pytest.raises(Exception) as failed:
        client.head_bucket(Bucket="mlflow")
    return failed.value


def http_failure(url: str) -> BaseException:
    with pytest.raises(requests.RequestException) as failed:
        requests.get(f"{url}/api/2.0/mlflow/runs/log-batch", timeout=5)
    return failed.value


def test_the_object_stores_refused_certificate_names_its_settings(tls_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "MLFLOW_S3_IGNORE_TLS"):
        monkeypatch.delenv(name, raising=False)
    transport = Transport(TrackingSettings(tracking_uri="http://127.0.0.1:5000", s3_endpoint=tls_server), None, "0")
    reason = transport.failure_reason(s3_failure(tls_server))
    assert "CERTIFICATE_VERIFY_FAILED" in reason and "AWS_CA_BUNDLE" in reason and "MLFLOW_S3_IGNORE_TLS" in reason
    assert "\n" not in reason and "MLFLOW_TRACKING_SERVER_CERT_PATH" not in reason


def test_the_tracking_servers_refused_certificate_names_its_setting(tls_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    transport = Transport(TrackingSettings(tracking_uri=tls_server, s3_endpoint="http://127.0.0.1:9000"), None, "0")
    reason = transport.failure_reason(http_failure(tls_server))
    assert "CERTIFICATE_VERIFY_FAILED" in reason and "MLFLOW_TRACKING_SERVER_CERT_PATH" in reason
    assert "AWS_CA_BUNDLE" not in reason


def test_any_other_failure_is_its_first_line_alone() -> None:
    transport = Transport(TrackingSettings(tracking_uri="http://127.0.0.1:5000"), None, "0")
    assert transport.failure_reason(ConnectionError("refused\nsecond line")) == "refused"


def test_a_tracking_server_that_is_gone_is_named_with_the_systems_reason() -> None:
    """Was each failed try's warning: "HTTPConnectionPool(host=…, port=…): Max retries exceeded with url: …
    (Caused by NewConnectionError(…: Failed to establish a new connection: [Errno 111] Connection refused))"."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{closed.getsockname()[1]}"
    transport = Transport(TrackingSettings(tracking_uri=gone), None, "0")
    assert transport.failure_reason(http_failure(gone)) == f"{gone}: Connection refused"
