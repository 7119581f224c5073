"""Folders written aside, then made visible in one rename; and what a failed local write says.

A staging folder's name carries the pid and start time of the process that writes it
(``.NAME.staging-PID-START-RANDOM``), so when that process dies without its clean-up
(``kill -9``, a SIGTERM nobody handled) the next process that stages beside it can tell the
owner is gone and remove the leftover, while a folder whose owner still runs is kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from plantml.errors import PlantmlError, StorageError, UsageError, os_reason
from plantml.processes import process_alive, process_start_time

_STAGING = re.compile(r"^\..*\.staging-(\d+)-(\d+)-[a-z0-9_]+$")
#: Errors of a disk that is full or failing; other refused writes (read-only, no permission) are the caller's to fix.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def sweep(parent: Path) -> list[Path]:
    """Remove the staging folders in ``parent`` whose process is gone; returns what was removed.

    Where ``/proc`` is missing (no way to tell who is alive) nothing is removed.
    """
    if process_start_time(os.getpid()) is None:
        return []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _STAGING.match(name)
        if match and not process_alive(int(match[1]), match[2]):
            shutil.rmtree(parent / name, ignore_errors=True)
            removed.append(parent / name)
    return removed


@contextlib.contextmanager
def staging_folder(parent: Path, name: str) -> Iterator[Path]:
    """A new private folder in ``parent`` for ``name``, removed on the way out unless renamed away.

    The leftovers of dead processes in ``parent`` are swept first.
    """
    sweep(parent)
    pid = os.getpid()
    owner = f"{pid}-{process_start_time(pid) or 0}"
    # Named before it exists (this process's pid and start time, 64 random bits: no other writer has it): a signal
    # raised just after the mkdir, before any try could be entered, still removes it. tempfile.mkdtemp returns the
    # name only after Python code that a handled SIGTERM interrupts, leaving the folder behind.
    folder = parent / f".{name}.staging-{owner}-{secrets.token_hex(8)}"
    try:
        os.mkdir(folder, 0o700)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def scratch_folder(name: str) -> Iterator[Path]:
    """A private :func:`staging_folder` for ``name`` in the system's temporary folder, removed on the way out.

    Unlike ``tempfile.TemporaryDirectory``, a signal landing just after it is made still removes it, and
    what a ``kill -9`` left there (a downloaded model: 100 MB for a resnet50) is swept by the next plantml
    process that needs one. A temporary folder that refuses the write is :func:`folder_error`'s one line.
    """
    parent = Path(tempfile.gettempdir())
    with contextlib.ExitStack() as scope:
        with local_writes("temporary folder (TMPDIR)", parent):  # only its making: a caller's OSError is not blamed on it
            folder = scope.enter_context(staging_folder(parent, name))
        yield folder


def set_aside(path: Path) -> Path:
    """Rename ``path`` beside itself under a staging name of this process, and return the new path.

    What is set aside is gone from its name in one step; if this process dies before removing
    it, the next process that stages in the same folder sweeps it.
    """
    pid = os.getpid()
    aside = path.with_name(f".{path.name[:16]}.staging-{pid}-{process_start_time(pid) or 0}-removing")
    os.rename(path, aside)
    return aside


def still_named(fd: int, path: Path) -> bool:
    """True when ``path`` still names the file or folder open at ``fd`` (a rename may have given the name to
    another, or taken it away): a lock taken on ``fd`` after opening ``path`` is only worth something then."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(named, os.fstat(fd))


#: How an error names the cache folder: with the variable that moves it (HOME read-only, or a file).
CACHE_FOLDER = "cache folder (PLANTML_CACHE_DIR)"


def folder_error(role: str, folder: Path, exc: OSError) -> PlantmlError:
    """One line naming ``folder`` and why it refused a write: a full or failing disk is a
    :class:`StorageError` (exit 1), a read-only or forbidden folder a :class:`UsageError` (exit 2)."""
    message = f"{role} {folder}: {os_reason(exc).lower()}"
    return StorageError(message) if exc.errno in _DISK_ERRNOS else UsageError(message)


@contextlib.contextmanager
def local_writes(role: str, folder: Path) -> Iterator[None]:
    """Turn an ``OSError`` of the block (it writes under ``folder``) into :func:`folder_error`'s one line."""
    try:
        yield
    except OSError as exc:
        raise folder_error(role, folder, exc) from None


def check_writable(role: str, folder: Path, mode: int = 0o777) -> None:
    """Make ``folder`` (with ``mode``, if it is made) and prove a file can be created in it: a folder that
    cannot be written is :func:`folder_error`'s one line before any work starts, not a failure in the middle of it."""
    with local_writes(role, folder):
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{role} {folder}: not a folder")
        folder.mkdir(mode=mode, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass


@contextlib.contextmanager
def folder_lock(folder: Path, timeout: float | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder`` itself (no lock file added to it) for the block; yields whether it is held.

    ``timeout`` None waits as long as the holder keeps it; otherwise the block runs unlocked after
    ``timeout`` seconds (best effort). The kernel releases the lock when its holder dies.
    """
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    held = False
                    break
                time.sleep(0.1)
        yield held
    finally:
        os.close(fd)  # releases the lock
