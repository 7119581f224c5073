"""What a tracker hands back: the run it opened, a model still on its way, runs found by a search.

Also what a run records when an exception ends it (:func:`error_tags`).
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plantml.errors import one_line
from plantml.text import safe_text
from plantml.tracking.entries import Entry, Tag
from plantml.tracking.validation import MAX_TAG_VAL_LENGTH

if TYPE_CHECKING:
    from plantml.tracking.tracker import MLflowTracker

logger = logging.getLogger(__name__)


class TrackedRun:
    """The run :meth:`MLflowTracker.start_run` opened; as a context manager it always ends it.

    Leaving the ``with`` block normally ends the run ``FINISHED``; an exception ends it
    ``FAILED`` (``KILLED`` for Ctrl-C or a handled signal) with the error type, message and
    traceback recorded as ``plantml.error.*`` tags, then lets the exception propagate.
    """

    def __init__(self, tracker: MLflowTracker, run: Any) -> None:
        self.tracker = tracker
        self.run_id: str = run.info.run_id
        self.info = run.info

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.tracker.run_id != self.run_id:
            return  # already ended inside the block
        if exc is None:
            self.tracker.end_run("FINISHED")
            return
        try:
            self.tracker.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", error=exc)
        except Exception as end_exc:  # the original error matters more than this one
            text = one_line(end_exc)  # most of the tracker's errors name the run already
            logger.warning("%s", text if text.startswith(f"run {self.run_id}") else f"run {self.run_id}: {text}")

    def __repr__(self) -> str:
        return f"TrackedRun(run_id={self.run_id!r})"


@dataclass
class PendingModel:
    """What :meth:`MLflowTracker.log_model` returns when the model is not stored yet.

    Delivery goes on in the background; once it is done, the model and its registry
    version appear on the server (or, if the run ends first, stay in its journal).
    """

    artifact_path: str
    registered_model_name: str | None = None
    registered_model_version: int | None = None
    model_id: str | None = None
    model_uri: str | None = None
    pending: bool = True


def flatten_run(run: Any) -> dict[str, Any]:
    """One MLflow ``Run`` as the flat dict ``search_runs`` returns (the design's keys)."""
    info = run.info
    flat: dict[str, Any] = {
        "run_id": info.run_id, "experiment_id": info.experiment_id, "run_name": info.run_name, "status": info.status,
        "start_time": info.start_time, "end_time": info.end_time, "artifact_uri": info.artifact_uri,
    }
    flat.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
    flat.update({f"params.{k}": v for k, v in run.data.params.items()})
    flat.update({f"tags.{k}": v for k, v in run.data.tags.items()})
    return flat


def best_run_order(metric: str, ascending: bool) -> str:
    """The ``order_by`` that puts the best run for ``metric`` first."""
    return f"metrics.`{metric}` {'ASC' if ascending else 'DESC'}"


def best_run(runs: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The first of ``runs`` (flat, best first) that has ``metric``: runs without it sort last,
    and a NaN value can sort first, so those are skipped."""
    key = f"metrics.{metric}"
    return next((run for run in runs if key in run and run[key] == run[key]), None)


def error_tags(exc: BaseException) -> list[Entry]:
    """The ``plantml.error.*`` tags of a run that ``exc`` ended: type, message, traceback (cut to MLflow's limit)."""
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    limit = MAX_TAG_VAL_LENGTH
    return [Tag("plantml.error.type", type(exc).__name__), Tag("plantml.error.message", safe_text(str(exc)[:limit]).replace("\x00", "")),
            Tag("plantml.error.traceback", safe_text(trace[-limit:]).replace("\x00", ""))]
