"""The stacks of this account that run now: listed from their records, stopped by their folder or env file.

Every stack records its folder where :func:`plantml.stack.folder.registry` says, and holds the
folder's lock for as long as it runs (the kernel lets go of it when its process dies, however it
dies). A stack runs when its lock is held: read from the kernel's table of locks
(``/proc/locks``), so looking never takes the lock a starting stack needs. Stopping one is what
Ctrl-C does in its terminal: SIGTERM to the process that started it, which stops its services,
removes its env file and lets go of the folder.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from plantml.stack.folder import LOCK, PRUNING, STATE, registry
from plantml.stack.service import LOOPBACK


@dataclass(frozen=True)
class RunningStack:
    """One stack that runs now: the process that holds it, its folder, its env file and MLflow's URL when known."""

    pid: int
    folder: Path
    temporary: bool
    env_file: Path | None = None
    tracking_uri: str | None = None

    def names(self, target: Path) -> bool:
        """Whether ``target`` (a data folder or an env file, as the user wrote it) is this stack's."""
        place = target.expanduser().absolute()
        return place in (self.folder, self.env_file) or place.resolve() in (self.folder, self.env_file)


def running_stacks() -> list[RunningStack]:
    """This account's stacks that run now, oldest record first."""
    found = []
    for record in sorted(registry().glob("*.json"), key=_modified):
        try:
            entry = json.loads(record.read_text())
            folder = Path(entry["folder"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record being written, or gone meanwhile: a prune tidies it
        pid = lock_holder(folder)
        if pid is not None:
            env_file = Path(entry["env_file"]) if entry.get("env_file") else None
            found.append(RunningStack(pid, folder, bool(entry.get("temporary")), env_file, _tracking_uri(folder)))
    return found


def _tracking_uri(folder: Path) -> str | None:
    """MLflow's URL, from the ports the stack's start recorded in its folder (None while it starts)."""
    try:
        ports = json.loads((folder / STATE).read_text())["ports"]["mlflow"]
        return f"http://{LOOPBACK}:{int(next(iter(ports.values())))}"
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def lock_holder(folder: Path) -> int | None:
    """The pid of the stack process holding ``folder``'s lock; None when none does (a prune holding it is none)."""
    lock = folder / LOCK
    try:
        info = os.stat(lock)
        written = lock.read_text(errors="replace").split()
    except OSError:
        return None
    if not written or not written[0].isdigit() or PRUNING in written[1:]:
        return None
    pid = int(written[0])
    return pid if (pid, info.st_dev, info.st_ino) in _flocks() else None


def _flocks() -> set[tuple[int, int, int]]:
    """(pid, device, inode) of every flock the kernel holds now."""
    held = set()
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return held
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[4].isdigit():
            major, minor, inode = fields[5].split(":")
            held.add((int(fields[4]), os.makedev(int(major, 16), int(minor, 16)), int(inode)))
    return held


def stop(stack: RunningStack, timeout: float) -> bool:
    """SIGTERM to the stack's process, then wait up to ``timeout`` seconds for its folder to be let go; whether it was."""
    try:
        os.kill(stack.pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock_holder(stack.folder) != stack.pid:
            return True
        time.sleep(0.2)
    return False


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
