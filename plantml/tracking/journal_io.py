"""The journal's file primitives: whole writes, whole reads, a file written whole before it takes its name."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path


def free_space(folder: Path) -> str:
    """Free space of the file system holding ``folder``, in words (``12.0 KiB free``)."""
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""  # pragma: no cover - the loop always returns


def partial_path(path: Path) -> Path:
    """Where :func:`write_whole` writes ``path`` before renaming it (a dot file: never listed as a journal)."""
    return path.with_name(f".{path.name}.new")


def write_whole(path: Path, data: bytes) -> int:
    """Put ``data`` at ``path`` as a new file, locked, written and fsynced before it takes the name; its descriptor.

    Recovery never reads a journal without its header, and never one half written.
    """
    partial = partial_path(path)
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        write_all(fd, data)
        os.fsync(fd)
        os.rename(partial, path)
    except BaseException:
        os.close(fd)
        partial.unlink(missing_ok=True)  # no stray partial file
        raise
    return fd


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_all(fd: int, offset: int = 0) -> bytes:
    chunks = []
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)
