"""The journal's files: whole writes, whole reads, a file written whole before it takes its name; finding journals."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
from pathlib import Path

from plantml.errors import TrackingError, UsageError
from plantml.tracking.journal_format import JournalHeader, parse_header

logger = logging.getLogger(__name__)

#: A journal's file name: ``<run_id>.jsonl``.
SUFFIX = ".jsonl"


class JournalWriteError(TrackingError):
    """The journal's disk refused a write: the call's entries were not accepted."""


#: How an error names the journal folder it was not given: with the variable that moves it (HOME read-only, or a file).
JOURNAL_FOLDER = "journal folder (PLANTML_JOURNAL_DIR)"


def journal_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where journals go: the argument, else ``$PLANTML_JOURNAL_DIR``, else ``journal`` in plantml's cache folder
    (``$PLANTML_CACHE_DIR``, ``~/.cache/plantml``): moving the cache (a service account's HOME) moves them too.

    Made absolute at once: spooled files are journalled by path, and the caller may change
    folder before the sender reads them.
    """
    from plantml.settings import cache_dir, env_path

    chosen = env_path("PLANTML_JOURNAL_DIR", explicit)
    return (chosen if chosen is not None else cache_dir() / "journal").absolute()


def write_error(folder: Path, exc: OSError) -> JournalWriteError:
    """The one-line error of a refused write, naming the folder and its free space."""
    return JournalWriteError(f"journal folder {folder}: cannot write ({exc.strerror or exc}); {free_space(folder)}")


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


def rewrite_whole(path: Path, data: bytes) -> int:
    """:func:`write_whole` over the journal at ``path``, whose lock the caller holds: a partial file left by a
    rewrite killed midway (no one else writes it while that lock is held) goes first."""
    partial_path(path).unlink(missing_ok=True)
    return write_whole(path, data)


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


def list_journals(folder: Path) -> list[Path]:
    """This account's journals in ``folder`` (not those kept aside, nor ones still being created), oldest first.

    A journal is delivered with this account's credentials and its artifact entries name files to upload: one
    another account planted (in a shared ``PLANTML_JOURNAL_DIR`` such as ``/tmp/journals``, or a folder made
    world-writable under ``umask 000``), or a link to one, would have this account send that account's run, or
    its own private files, to the server. Such a file is passed over, with a warning naming it."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob(f"*{SUFFIX}"):
        try:
            info = path.lstat()
        except FileNotFoundError:  # recovered or kept aside meanwhile
            continue
        if path.name.startswith("."):
            continue
        if info.st_uid != os.geteuid() or not stat.S_ISREG(info.st_mode):
            logger.warning("journal %s: not a file of this account (uid %d), so not recovered", path, info.st_uid)
            continue
        found.append((info.st_mtime, path))
    return [path for _, path in sorted(found)]


def read_header(path: Path) -> JournalHeader:
    """A journal's header alone (no lock taken): enough to decide whether to recover it."""
    try:
        with open(path, "rb") as src:
            first = src.readline()
    except FileNotFoundError:
        raise UsageError(f"journal {path}: no such file") from None
    return parse_header(first.rstrip(b"\n"), path)
