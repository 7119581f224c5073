"""The trackers of this process, so that no run outlives it RUNNING.

A run still open when the interpreter exits (or when a signal nothing caught ends it) is
ended KILLED: its journal delivered as far as the time allows, its status set.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Any

from plantml.errors import one_line

logger = logging.getLogger(__name__)

_LIVE_TRACKERS: weakref.WeakSet[Any] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def register(tracker: Any) -> None:
    """Remember ``tracker`` (weakly) so that its open run is ended at exit."""
    with _LIVE_LOCK:
        _LIVE_TRACKERS.add(tracker)


def end_abandoned_runs(announce: bool = True) -> None:
    """End KILLED every run a tracker of this process still has open (at exit, or on a signal nothing caught)."""
    with _LIVE_LOCK:
        trackers = list(_LIVE_TRACKERS)
    for tracker in trackers:
        run_id = tracker.run_id
        if run_id is not None:
            if announce:  # on a signal, the one line that reports it says how the run ended
                logger.warning("run %s was never ended: ending it KILLED", run_id)
            try:
                tracker.end_run("KILLED")
            except Exception as exc:
                logger.warning("run %s: could not end it: %s", run_id, one_line(exc))


def end_runs_quietly(interrupted: BaseException) -> None:
    """:func:`end_abandoned_runs` for a signal: the line that reports the signal says how runs ended."""
    end_abandoned_runs(announce=False)


atexit.register(end_abandoned_runs)
