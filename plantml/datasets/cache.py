"""The local cache of pulled data sets: what it holds, what a training uses, removing what nobody used lately.

A pulled set lives in ``<cache>/datasets/<digest>/`` (see :mod:`plantml.datasets.remote`).
A training holds a shared lock on its set's folder (an ``flock`` on the folder itself: no
file is added to the set) for as long as it uses the set, and sets the folder's time to
now when it takes it: the set's *last use*. :func:`remove_unused` removes the sets whose last
use is older than a duration, never one a training holds: each is locked exclusively, then
renamed aside in one step (a training that looks for it then finds no set, never half of one,
and pulls it again), then deleted; a removal killed midway leaves a staging folder that the
next pull sweeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from plantml.datasets.manifest import MANIFEST_NAME, Manifest
from plantml.errors import DataError, PlantmlError
from plantml.staging import CACHE_FOLDER, local_writes, set_aside, still_named


@dataclass(frozen=True)
class CachedSet:
    """One pulled set in the cache."""

    digest: str
    folder: Path
    name: str
    files: int
    size_bytes: int
    #: When a training last took it (seconds since the epoch).
    last_used: float
    in_use: bool


class SetHold:
    """A training's shared lock on one cached set; released by :meth:`close`, or when collected, or at exit."""

    def __init__(self, fd: int, folder: Path) -> None:
        self._fd: int | None = fd
        self.folder = folder

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def hold(folder: Path) -> SetHold | None:
    """Take a shared lock on the cached set at ``folder`` and mark it used now; None when it was removed meanwhile."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits out a removal that holds it (a rename: an instant)
        if not still_named(fd, folder):  # removed between our open and our lock
            os.close(fd)
            return None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # a cache this user cannot write keeps its times
        os.utime(folder)
    return SetHold(fd, folder)


def cached_sets(cache_root: Path) -> list[CachedSet]:
    """Every set in the cache, least recently used first (staging folders of pulls and removals are not sets)."""
    parent = cache_root / "datasets"
    try:
        children = [child for child in parent.iterdir() if not child.name.startswith(".") and child.is_dir()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DataError(f"{CACHE_FOLDER} {parent}: cannot be read ({exc.strerror})") from None
    found = [_describe(child) for child in children]
    return sorted((s for s in found if s is not None), key=lambda s: s.last_used)


def remove_unused(cache_root: Path, unused_for_s: float, *, dry_run: bool = False) -> list[CachedSet]:
    """Remove the sets not used for ``unused_for_s`` seconds and not in use; returns those removed (or that would be)."""
    removed = []
    now = time.time()
    for cached in cached_sets(cache_root):
        if cached.in_use or now - cached.last_used < unused_for_s:
            continue
        if dry_run:
            removed.append(cached)
            continue
        with local_writes(CACHE_FOLDER, cached.folder.parent), _exclusive(cached.folder) as fd:
            if fd is None or now - os.fstat(fd).st_mtime < unused_for_s:
                continue  # a training took it since it was listed
            aside = set_aside(cached.folder)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(cached)
    return removed


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[int | None]:
    """The folder's descriptor, locked exclusively while the block runs; None when a training holds it or it is gone."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd if still_named(fd, folder) else None
    finally:
        os.close(fd)


def _describe(folder: Path) -> CachedSet | None:
    try:
        manifest = Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), str(folder / MANIFEST_NAME))
        name, files, size = manifest.name, len(manifest.files), manifest.total_bytes
    except (OSError, PlantmlError):  # not written by a pull (or damaged): still a folder taking room
        name, files, size = "?", 0, _bytes_under(folder)
    with _exclusive(folder) as fd:
        in_use = fd is None and folder.is_dir()
    try:
        last_used = folder.stat().st_mtime
    except FileNotFoundError:
        return None  # removed meanwhile
    return CachedSet(folder.name, folder, name, files, size, last_used, in_use)


def _bytes_under(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total
