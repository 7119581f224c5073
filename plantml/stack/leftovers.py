"""The leftovers of stacks whose owner died before its teardown (``kill -9``, a crash): found and removed.

Every stack folder is recorded under ``$PLANTML_CACHE_DIR/stacks`` (see :mod:`plantml.stack.folder`);
a stack is gone when its folder's lock is free. Its services got their stop signal when their
owner died; each is given :data:`~plantml.stack.folder.GRACE_S` to end, then killed, so that a
new start may use the folder (PostgreSQL refuses a data folder whose postmaster still runs).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from plantml.errors import PlantmlError, StackError
from plantml.processes import process_alive, process_start_time
from plantml.stack import folder as stack_folder
from plantml.stack.folder import SERVICE_MARK, SERVICE_PROGRAMS, STATE, StackFolder, registry

log = logging.getLogger(__name__)


def prune_local_stacks() -> list[str]:
    """Clean up the stacks whose owning process is gone: their processes, and their folder if temporary.

    A stack is gone when its folder's lock is free. Returns what was removed, in words.
    """
    removed = []
    for record in sorted(registry().glob("*.json")):
        try:
            entry = json.loads(record.read_text())
            folder = StackFolder(Path(entry["folder"]), bool(entry["temporary"]), record.stem)
            if "env_file" in entry:
                folder.env_file = (Path(entry["env_file"]), str(entry["env_sha256"]))
        except (OSError, ValueError, KeyError):
            record.unlink(missing_ok=True)
            continue
        if folder.path.exists():
            try:
                folder.lock(pruning=True)
            except PlantmlError:
                continue  # alive (or a folder that cannot take its lock now: left for a later prune)
            processes = _recorded_processes(folder)
            processes.update(_unrecorded_services(folder.path, {process["pid"] for process in processes.values()}))
            for name, process in processes.items():
                if _end_process_group(process["pid"], process["started"]):
                    removed.append(f"{name} process {process['pid']}")
        env_file = folder.env_file
        if env_file is not None and folder.remove_env_file():
            removed.append(f"env file {env_file[0]}")
        folder.close()
        removed.append(f"stack folder {folder.path}" if folder.temporary else f"lock of {folder.path}")
    return removed


def _recorded_processes(folder: StackFolder) -> dict[str, dict[str, Any]]:
    """The processes a dead stack's state file names; none when it cannot be read (a crash cut it short): its
    services got their stop signal when their owner died, and one bad file must not stop every later start."""
    try:
        processes = folder.read_json(STATE).get("processes", {})
        return {name: {"pid": int(entry["pid"]), "started": str(entry["started"])} for name, entry in processes.items()}
    except (StackError, AttributeError, KeyError, TypeError, ValueError) as exc:
        log.warning("prune: %s; its processes are not waited for", getattr(exc, "cause", exc))
        return {}


def _unrecorded_services(path: Path, recorded: set[int]) -> dict[str, dict[str, Any]]:
    """Services of a dead stack that its state file does not name (its start was killed between a spawn and
    the record of it): the PostgreSQL and SeaweedFS processes whose environment marks them as services of a
    folder in ``path`` (:data:`SERVICE_MARK`). The next start must wait for them too (a SeaweedFS still
    shutting down holds its store's lock). A process whose command line merely names the folder is not one:
    another stack whose path contains this one's (``/restore/srv/plantml`` for ``/srv/plantml``), a person's
    ``postgres --single`` on its database."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            program = Path(os.fsdecode((entry / "cmdline").read_bytes().split(b"\0", 1)[0])).name
            if program not in SERVICE_PROGRAMS or int(entry.name) in recorded:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile, or another account's that we may not read: not one we started
            continue
        marks = [os.fsdecode(item).partition("=")[2] for item in environ if item.startswith(f"{SERVICE_MARK}=".encode())]
        started = process_start_time(int(entry.name))
        if started is not None and marks and Path(marks[0]).parent == path:
            found[f"{program} (unrecorded)"] = {"pid": int(entry.name), "started": started}
    return found


def _wait_until_gone(pid: int, started: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid, started):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _end_process_group(pid: int, started: str) -> bool:
    """End a dead stack's service: it got its stop signal when its owner died (``--pdeathsig``), so it is given
    :data:`~plantml.stack.folder.GRACE_S` to finish (PostgreSQL writes a checkpoint), then its process group is killed; returns
    whether the process was still there. Only once it is gone may a new start use its folder: PostgreSQL
    refuses a data folder whose postmaster still runs."""
    if not process_alive(pid, started):
        return False
    if not _wait_until_gone(pid, started, stack_folder.GRACE_S):
        try:
            os.killpg(pid, signal.SIGKILL)  # each local service leads its own process group
        except OSError:  # a container's process, or one that just ended
            pass
        _wait_until_gone(pid, started, stack_folder.GRACE_S)
    return True
