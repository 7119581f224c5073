"""Behind an HTTP proxy, as on many company machines and CI runners: the stack and its clients still reach 127.0.0.1.

The proxy here is the kind a remote one is to this machine's loopback: it answers every request with 502 (it cannot
reach the host asked for), and records what reached it. Each backend's session runs this (the containers backend's
Docker client is one more HTTP client).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from _processes import stop

pytestmark = pytest.mark.integration

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture
def unreaching_proxy() -> Iterator[tuple[str, list[str]]]:
    """An HTTP proxy on 127.0.0.1 that reaches nothing: its URL, and the request lines that reached it."""
    seen: list[str] = []

    class Refuse(BaseHTTPRequestHandler):
        def refuse(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.send_error(502, "the proxy cannot reach that host")

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = do_PATCH = do_CONNECT = refuse

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_behind_a_proxy_stack_up_and_verify_reach_the_stack_directly_and_send_the_proxy_nothing(
        unreaching_proxy, tmp_path, pytestconfig):
    """Was: `stack up` failed after 45 s as "s3: not ready" with a page of the object store's log; `verify` against a
    running stack said "http://127.0.0.1:PORT unreachable (connection refused or no route)". The stack is kept in a
    folder whose path holds a space: the command its stop prints to start it again is quoted for the shell."""
    proxy, seen = unreaching_proxy
    env = {**{k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", *PROXY_VARIABLES)},
           **{name: proxy for name in PROXY_VARIABLES}}
    env_file = tmp_path / ".env"  # where verify, run in that folder, reads it
    kept = Path(tempfile.mkdtemp(prefix="plantml team stack "))  # in /tmp: PostgreSQL's account must traverse it
    up = subprocess.Popen([sys.executable, "-m", "plantml", "stack", "up", "--env-file", str(env_file),
                           "--backend", pytestconfig.getoption("--stack"), "--data-dir", str(kept)],
                          env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = []
    try:
        for line in up.stdout:
            started.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        assert env_file.exists(), "".join(started)[-3000:]
        verify = subprocess.run([sys.executable, "-m", "plantml", "verify"], env=env,
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        output = stop(up)
        shutil.rmtree(kept, ignore_errors=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.splitlines()[-1] == "✓ ALL MLFLOW TESTS PASSED"
    assert "plantml stack ready" in "".join(started) and "error" not in output.lower(), output
    assert seen == []
    assert output.splitlines()[-1] == f"plantml stack: stopped; data kept in {kept} (start again with --data-dir '{kept}')"
