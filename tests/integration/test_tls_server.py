"""A tracking server behind HTTPS on a private CA: plantml reaches it with MLflow's own TLS settings.

A real ``mlflow server`` (sqlite, artifacts served by the server) under uvicorn's TLS, its certificate signed by a
throwaway CA. Its subject is the client, so the local backend's session runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests
from _processes import stop_group
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from plantml.errors import TrackingError
from plantml.stack.ports import free_port
from plantml.stack.tls import make_mutual_tls
from plantml.tracking import MLflowTracker

pytestmark = pytest.mark.local_session


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    """``https://127.0.0.1:PORT`` of a running MLflow server, and its CA's certificate file."""
    folder = tmp_path_factory.mktemp("https-mlflow")
    tls = make_mutual_tls("plantml-test-server")
    (folder / "ca.pem").write_bytes(tls.ca_cert)
    (folder / "cert.pem").write_bytes(tls.cert)
    (folder / "key.pem").write_bytes(tls.key)
    port = free_port(set())
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
         "--uvicorn-opts", f"--ssl-keyfile {folder / 'key.pem'} --ssl-certfile {folder / 'cert.pem'}"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # uvicorn is its child
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"https://127.0.0.1:{port}"

    @retry(stop=stop_after_delay(90), wait=wait_fixed(0.5), retry=retry_if_exception_type(requests.RequestException))
    def wait_ready() -> None:
        assert server.poll() is None, "mlflow server exited"
        requests.get(f"{uri}/health", timeout=2, verify=str(folder / "ca.pem")).raise_for_status()

    try:
        wait_ready()
        yield uri, folder / "ca.pem"
    finally:
        stop_group(server, timeout=3)  # uvicorn waits for the clients' kept-alive connections to close: 30 s seen


def test_a_tracker_reaches_an_https_server_on_a_private_ca_as_mlflow_does(https_server, tmp_path, monkeypatch):
    import mlflow

    uri, ca = https_server
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(ca))
    monkeypatch.setenv("PLANTML_JOURNAL_DIR", str(tmp_path / "journal"))
    artifact = tmp_path / "notes.txt"
    artifact.write_text("over https\n")
    tracker = MLflowTracker(tracking_uri=uri, experiment_name="over-tls", connect_timeout=20)
    run_id = tracker.start_run(run_name="tls").run_id
    tracker.log_params({"backbone": "resnet18"})
    tracker.log_metric("val_accuracy", 0.75, step=1)
    tracker.log_artifact(artifact)
    tracker.end_run()

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"backbone": "resnet18"} and run.data.metrics == {"val_accuracy": 0.75}
    assert [item.path for item in client.list_artifacts(run_id)] == ["notes.txt"]


def test_a_certificate_this_machine_does_not_trust_fails_at_once_naming_the_setting(https_server, tmp_path, monkeypatch):
    uri, _ = https_server
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH", raising=False)
    monkeypatch.setenv("PLANTML_JOURNAL_DIR", str(tmp_path / "journal"))
    started = time.monotonic()
    with pytest.raises(TrackingError) as refused:
        MLflowTracker(tracking_uri=uri, experiment_name="over-tls", connect_timeout=20).start_run()
    assert time.monotonic() - started < 10  # not the whole connect timeout: asking again cannot change a certificate
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{uri}: the TLS handshake with the tracking server failed")
    assert "CERTIFICATE_VERIFY_FAILED" in message and "MLFLOW_TRACKING_SERVER_CERT_PATH" in message
