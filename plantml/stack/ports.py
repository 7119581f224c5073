"""A stack's ports and data folder: free ports chosen, and what its caller gives checked before anything starts."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import port_for

from plantml.errors import ConfigError
from plantml.stack.s3 import FILER_SOCKET, S3_SOCKET
from plantml.stack.service import LOOPBACK


def port_in_use(port: int) -> bool:
    """True when something already listens on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def free_port(taken: set[int]) -> int:
    """A free loopback port not in ``taken`` (which it joins)."""
    port = port_for.select_random(exclude_ports=taken)
    taken.add(port)
    return port


def check_ports(fixed: dict[str, int | None]) -> dict[str, int | None]:
    """Fixed ports as given (None: a free one), refused at once when out of range or given to two services:
    the second service would fail to bind and the start would wait for it."""
    for name, port in fixed.items():
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"{name}_port={port}: expected a port from 1 to 65535 (or None for a free one)")
    given = [(name, port) for name, port in fixed.items() if port is not None]
    for index, (name, port) in enumerate(given):
        for other, other_port in given[index + 1:]:
            if port == other_port:
                raise ConfigError(f"{name}_port and {other}_port are both {port}: each service needs its own port")
    return fixed


#: The longest path a Unix socket can have (``sun_path``, with its NUL); the object store keeps two in its folder.
SOCKET_PATH_MAX = 107


def check_data_dir(path: Path, what: str = "data folder", remedy: str = "") -> Path:
    """Refuse a data folder the object store cannot work in, in one line rather than its crash dump.

    The path checked is the one the services get: with its symbolic links resolved, as :meth:`StackFolder.open` does
    (a short link to a long folder would pass a check of the link's own path)."""
    raw = os.fsencode(path.expanduser().resolve())
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: its path is not UTF-8, which SeaweedFS needs; choose another{remedy}") from None
    longest = raw + os.fsencode(f"/s3/{max(FILER_SOCKET, S3_SOCKET, key=len)}")  # the object store's folder: see ManagedStack._describe
    if len(longest) > SOCKET_PATH_MAX:
        raise ConfigError(f"{what} {path}: its path is {len(raw)} bytes; the object store's sockets in it "
                          f"({longest.decode()}) would pass the {SOCKET_PATH_MAX}-byte limit of a Unix socket path{remedy}")
    return path
