"""Private files and folders of a stack: written whole, readable by their owner only, and synced."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: Path, content: str | bytes, owner: tuple[int, int] | None = None) -> None:
    """Write a file readable by its owner only (0600), atomically; ``owner`` is (uid, gid) when not us.

    The bytes go to a new file of a random name beside ``path`` (``O_EXCL``: never a file or
    link someone else put there), then replace ``path``: the mode is 0600 whatever was there.
    The file and then its folder are synced: a crash must not keep a cluster whose password
    (``credentials.json``) was still in the page cache, nor leave the file empty.
    """
    data = content.encode() if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync ``folder`` itself, so that a file renamed into it survives a crash under that name."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_folder(path: Path, owner: tuple[int, int] | None = None, mode: int = 0o700) -> Path:
    """Create (or fix) a folder with ``mode``, owned by ``owner`` when it is not us."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if owner is not None:
        os.chown(path, *owner)
    return path
