"""A loopback HTTP proxy that breaks requests on purpose, for fault tests against a real server.

:class:`FaultProxy` listens on 127.0.0.1 and forwards each request to the server behind
it, except those a planned fault picks (:meth:`FaultProxy.inject`):

- ``hang``: read the request, never forward it, hold the connection ``hold_s`` seconds
  (the client's timeout fires), then reset it;
- ``reset``: read the request, never forward it, reset the connection (TCP RST);
- ``status``: answer ``status`` (503 by default) without forwarding;
- ``drop_answer``: forward the request (the server does the work), read the answer, then
  reset the client's connection instead of passing the answer on.

Every request is recorded (:attr:`FaultProxy.requests`) and every fault that struck is
counted (:attr:`FaultProxy.mangled`), so a test can assert that its fault happened.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

FAULTS = ("hang", "reset", "status", "drop_answer")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}


@dataclass(frozen=True)
class SeenRequest:
    """One request the proxy received."""

    method: str
    path: str
    body: bytes


@dataclass
class _Plan:
    fault: str
    times: int | None  # None: every matching request
    when: Callable[[SeenRequest], bool]
    status: int = 503
    hold_s: float = 5.0
    hits: int = field(default=0)


class FaultProxy:
    """A proxy on 127.0.0.1 in front of ``upstream`` (``http://127.0.0.1:PORT``); use it as a context manager."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"fault proxy: {upstream} is not on this machine (tests talk to loopback only)")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.requests: list[SeenRequest] = []
        self.mangled: Counter[str] = Counter()
        self._plans: list[_Plan] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        """Where clients should send their requests."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def inject(self, fault: str, *, times: int | None = 1, when: Callable[[SeenRequest], bool] = lambda request: True,
               status: int = 503, hold_s: float = 5.0) -> None:
        """Apply ``fault`` to the next ``times`` requests ``when`` accepts (every one if ``times`` is None)."""
        if fault not in FAULTS:
            raise ValueError(f"fault {fault!r}: choose one of {', '.join(FAULTS)}")
        with self._lock:
            self._plans.append(_Plan(fault, times, when, status, hold_s))

    def clear(self) -> None:
        """Forget the faults still planned; later requests are forwarded."""
        with self._lock:
            self._plans.clear()

    def count(self, path_part: str, method: str | None = None) -> int:
        """How many requests so far had ``path_part`` in their path (and ``method``, if given)."""
        return sum(1 for r in list(self.requests) if path_part in r.path and (method is None or r.method == method))

    def _pick(self, request: SeenRequest) -> _Plan | None:
        with self._lock:
            self.requests.append(request)
            for plan in self._plans:
                if (plan.times is None or plan.hits < plan.times) and plan.when(request):
                    plan.hits += 1
                    self.mangled[plan.fault] += 1
                    return plan
        return None

    def _forward(self, request: SeenRequest, headers: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            connection.request(request.method, request.path, body=request.body or None, headers=forwarded)
            answer = connection.getresponse()
            body = answer.read()
            return answer.status, [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP], body
        finally:
            connection.close()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the client sees "connection reset by peer"."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """One connection to the proxy: each request is forwarded, or broken as planned."""

        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            """Quiet: the proxy's record is :attr:`FaultProxy.requests`."""

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = SeenRequest(self.command, self.path, self.rfile.read(length) if length else b"")
            plan = proxy._pick(request)
            if plan is not None and plan.fault in ("hang", "reset"):
                if plan.fault == "hang":
                    proxy._stopping.wait(plan.hold_s)
                self.close_connection = True
                _reset(self.connection)
                return
            if plan is not None and plan.fault == "status":
                body = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected by the fault proxy"}'
                self._answer(plan.status, [("Content-Type", "application/json")], body)
                return
            status, headers, body = proxy._forward(request, self.headers)
            if plan is not None:  # drop_answer: the server did the work, the client never hears it
                self.close_connection = True
                _reset(self.connection)
                return
            self._answer(status, headers, body)

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815 - http.server's names

    return Handler
