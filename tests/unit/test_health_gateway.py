"""A tracking server behind a gateway that guards every path, ``/health`` too: plantml's probes send MLflow's credentials.

A real HTTP server on 127.0.0.1 stands for the gateway (an auth proxy in front of MLflow, as many teams run): it
answers 401 to any request without ``Authorization: Bearer <token>`` or the basic-auth pair, and 200 ``OK`` at
``/health`` otherwise. MLflow's client sends ``MLFLOW_TRACKING_TOKEN`` (or USERNAME/PASSWORD) with every request.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from plantml.settings import TrackingSettings
from plantml.stack.external import check_mlflow
from plantml.verification import run_checks

TOKEN = "gateway-token"
BASIC = "Basic " + base64.b64encode(b"alice:wonderland").decode()


class Gateway(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        allowed = self.headers.get("Authorization") in (f"Bearer {TOKEN}", BASIC)
        body = b"OK" if allowed else b"denied"
        self.send_response(200 if allowed else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mlflow"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("credentials", [{"MLFLOW_TRACKING_TOKEN": TOKEN},
                                         {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "wonderland"}])
def test_a_server_behind_a_gateway_answers_health_with_mlflows_credentials(gateway, credentials, monkeypatch):
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    check_mlflow(gateway)  # an external stack's readiness: raised "answered HTTP 401" before


@pytest.mark.parametrize("token, cause", [
    (None, "answered HTTP 401; no credentials were sent: set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME"),
    ("stale", "answered HTTP 401; MLFLOW_TRACKING_TOKEN was refused"),
])
def test_verify_names_the_credential_setting_a_gateway_refuses(gateway, token, cause, monkeypatch):
    if token:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    first = next(iter(run_checks(TrackingSettings(tracking_uri=gateway))))
    assert not first.ok and cause in first.cause and "\n" not in first.cause
