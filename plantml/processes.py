"""Telling whether a process is still the one that wrote something (a lock, a staging folder).

A pid alone is not enough: pids are reused. A pid with its start time (read from
``/proc/PID/stat``) names one process for good, so a leftover marked with both can be
removed once that process is gone, and never while it runs.
"""

from __future__ import annotations

import os
from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def process_start_time(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), None when it does not exist.

    With the pid it identifies one process even after the pid is reused.
    """
    fields = proc_stat(pid)
    return fields[19] if fields is not None else None


def process_alive(pid: int, started: str) -> bool:
    """True while the process ``pid`` that started at ``started`` exists and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


def working_in(folder: Path) -> list[int]:
    """The pids of the processes whose working folder is ``folder`` or one in it (those we may look at)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:  # ended meanwhile, a zombie, or another account's
            continue
        if cwd.is_relative_to(folder):
            found.append(int(entry.name))
    return found
