"""The trackers of this process, so that no run outlives it RUNNING.

A run still open when the interpreter exits (or when a signal nothing caught ends it) is
ended KILLED: its journal delivered as far as the time allows, its status set.

The delivery happens in two steps, because Python stops every thread pool before it runs
``atexit`` handlers: from then on boto3 cannot upload (``cannot schedule new futures after
interpreter shutdown``), so an artifact logged just before a script ended (an exception, a
``return`` without ``end_run``) would wait out the whole delivery timeout and stay in the
journal. So what is pending is first flushed while thread pools still work (threading's own
exit hook, run before the pools stop), and the run is ended later at ``atexit``, once the
program's other threads (which may still log to it) have finished.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - its exit hook must be registered before ours (they run newest first)
import logging
import threading
from typing import Any

from plantml.errors import one_line

logger = logging.getLogger(__name__)

#: The trackers with a run open, held until it ends: a tracker nobody holds any more (made in a function that
#: returned without ``end_run``, a notebook cell run again) would otherwise take its run's end with it, leaving
#: the run RUNNING for good and what it logged last undelivered.
_LIVE_TRACKERS: dict[int, Any] = {}
_LIVE_LOCK = threading.Lock()


def opened(tracker: Any) -> None:
    """Hold ``tracker``, whose run just started, until :func:`closed`, so that the run is ended at exit."""
    with _LIVE_LOCK:
        _LIVE_TRACKERS[id(tracker)] = tracker


def closed(tracker: Any) -> None:
    """Let go of ``tracker``: its run has ended (or belongs to the process it was forked from)."""
    with _LIVE_LOCK:
        _LIVE_TRACKERS.pop(id(tracker), None)


#: Runs whose flush at exit ran out of time: their end waits no second timeout.
_NOT_FLUSHED: set[str] = set()


def flush_open_runs() -> None:
    """Deliver what every open run has pending, while thread pools still take work (see the module docstring)."""
    with _LIVE_LOCK:
        trackers = list(_LIVE_TRACKERS.values())
    for tracker in trackers:
        run_id = tracker.run_id
        if run_id is not None:
            try:
                if not tracker.flush(tracker.delivery_settings.timeout_s):
                    _NOT_FLUSHED.add(run_id)
            except KeyboardInterrupt:  # Ctrl-C while the exit waits: end the runs now, the journals keep the rest
                _NOT_FLUSHED.update(t.run_id for t in trackers if t.run_id is not None)
                return
            except Exception as exc:
                logger.warning("run %s: could not deliver what it logged: %s", run_id, one_line(exc))


def end_abandoned_runs(announce: bool = True) -> None:
    """End KILLED every run a tracker of this process still has open (at exit, or on a signal nothing caught)."""
    with _LIVE_LOCK:
        trackers = list(_LIVE_TRACKERS.values())
    for tracker in trackers:
        run_id = tracker.run_id
        if run_id is not None:
            if announce:  # on a signal, the one line that reports it says how the run ended
                logger.warning("run %s was never ended: ending it KILLED", run_id)
            try:
                # a flush at exit that already waited the delivery timeout: end now, the journal keeps the rest
                tracker.end_run("KILLED", timeout=0.0 if run_id in _NOT_FLUSHED else None)
            except Exception as exc:
                logger.warning("run %s: could not end it: %s", run_id, one_line(exc))


def end_runs_quietly(interrupted: BaseException) -> None:
    """:func:`end_abandoned_runs` for a signal: the line that reports the signal says how runs ended."""
    end_abandoned_runs(announce=False)


# threading's exit hooks run before thread pools are stopped (private, but what concurrent.futures itself uses)
getattr(threading, "_register_atexit", lambda hook: None)(flush_open_runs)
atexit.register(end_abandoned_runs)
