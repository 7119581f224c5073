"""Deliver a journal that ``end_run`` left behind, then end its run with its true status.

A journal (:mod:`plantml.tracking.journal`) holds, in order, everything a run logged
that did not reach the server before ``end_run`` gave up, its end request last. Replay
sends it with the same delivery code and retry policy as the sender, with one extra
precaution: every metric point and param is checked against what the server already
stores (one metric-history read per key, then kept up to date locally), because some
of them may have arrived before the journal was written. Tags are resent. A model
resumes after its last completed step (logged model created, files stored, version
registered). Progress is written back to the journal as it goes, so an interrupted
replay can be run again. Once everything is delivered, the run is tagged
``plantml.delivery=complete`` and ends with the status that was asked for; the journal
and its spooled files are then removed.

The journal names the tracking URI but holds no secret: S3 credentials come from the
environment or a ``.env`` file, as for any tracker.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plantml.errors import TrackingError
from plantml.settings import resolve_tracking_settings
from plantml.tracking.batching import MetricPoint, _one_line
from plantml.tracking.delivery import Delivery, _point_id, discard_spool, is_permanent
from plantml.tracking.journal import Entry, JournalHeader, read_journal, write_journal
from plantml.tracking.sender import JOURNAL_TAG, PENDING_TAG, take_batch

logger = logging.getLogger(__name__)


@dataclass
class ReplayResult:
    """What a replay did."""

    run_id: str
    delivered: int = 0
    already_stored: int = 0
    rejected: int = 0
    status: str | None = None
    model_versions: list[int] | None = None


class _Replayer:
    def __init__(self, path: Path, header: JournalHeader, delivery: Delivery, deadline: float, max_backoff: float) -> None:
        self.path = path
        self.header = header
        self.delivery = delivery
        self.deadline = deadline
        self.max_backoff = max_backoff
        self.stored: dict[str, set[Any]] = {}
        self.params: dict[str, str] | None = None
        self.result = ReplayResult(header.run_id, model_versions=[])
        self.model_rejected = False

    def retry(self, action: Any, *args: Any) -> Any:
        from tenacity import Retrying, retry_if_exception, stop_before_delay, wait_exponential

        retrying = Retrying(
            retry=retry_if_exception(lambda exc: not is_permanent(exc)),
            wait=wait_exponential(multiplier=0.2, min=0.2, max=self.max_backoff),
            stop=stop_before_delay(max(0.0, self.deadline - time.monotonic())),
            before_sleep=lambda state: logger.warning("replay: %s; retrying", _one_line(state.outcome.exception())),
            reraise=True,
        )
        return retrying(action, *args)

    def send_logs(self, run_id: str, batch: list[Entry]) -> None:
        metrics = [MetricPoint(*e["m"]) for e in batch if "m" in e]
        params = [tuple(e["p"]) for e in batch if "p" in e]
        tags = [tuple(e["t"]) for e in batch if "t" in e]
        for key in {m.key for m in metrics} - set(self.stored):
            self.stored[key] = self.retry(self.delivery.stored_points, run_id, key)
        if params and self.params is None:
            self.params = self.retry(self.delivery.stored_params, run_id)
        new_metrics = [m for m in metrics if _point_id(m.step, m.timestamp, m.value) not in self.stored[m.key]]
        new_params = [(k, v) for k, v in params if k not in (self.params or {})]
        self.result.already_stored += len(metrics) - len(new_metrics) + len(params) - len(new_params)
        if new_metrics or new_params or tags:
            self.retry(self.delivery.log_batch, run_id, new_metrics, new_params, tags)
        for m in new_metrics:
            self.stored[m.key].add(_point_id(m.step, m.timestamp, m.value))
        if self.params is not None:
            self.params.update(dict(new_params))
        self.result.delivered += len(new_metrics) + len(new_params) + len(tags)

    def deliver(self, batch: list[Entry]) -> None:
        first = batch[0]
        run_id = first["run"]
        if "artifact" in first:
            self.retry(self.delivery.upload, run_id, first["artifact"])
        elif "model" in first:
            info = self.retry(self.delivery.deliver_model, run_id, first["model"])
            if getattr(info, "registered_model_version", None) is not None:
                self.result.model_versions.append(int(info.registered_model_version))
        elif "end" in first:
            status = "FAILED" if self.model_rejected else first["end"]
            self.retry(self.delivery.log_batch, run_id, [], [], [(PENDING_TAG, "complete"), (JOURNAL_TAG, "")])
            self.retry(self.delivery.terminate, run_id, status, first.get("at"))
            self.result.status = status
        else:
            self.send_logs(run_id, batch)
            return
        self.result.delivered += 1


def replay(
    journal: str | os.PathLike[str],
    *,
    tracking_uri: str | None = None,
    timeout: float = 300.0,
    max_backoff: float = 5.0,
    env_file: str | os.PathLike[str] | None = None,
) -> ReplayResult:
    """Deliver ``journal`` (retrying up to ``timeout`` seconds), end its run, remove the journal.

    ``tracking_uri`` overrides the journal's (a server that moved). Raises
    :class:`TrackingError` if the server stays unreachable; the journal then keeps what
    is still undelivered.
    """
    import mlflow

    path = Path(journal)
    header, entries = read_journal(path)
    settings = resolve_tracking_settings(tracking_uri or header.tracking_uri, env_file=env_file)
    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    delivery = Delivery(settings, client, header.experiment_id)
    replayer = _Replayer(path, header, delivery, time.monotonic() + timeout, max_backoff)
    queue: deque[Entry] = deque(entries)
    since_save = 0
    while queue:
        batch = take_batch(queue)
        try:
            replayer.deliver(batch)
        except Exception as exc:
            if not is_permanent(exc):
                write_journal(path, header, queue)  # progress kept (model steps included)
                raise TrackingError(
                    f"replay of {path}: {settings.tracking_uri} still failing after {timeout:.0f} s "
                    f"({_one_line(exc)}); {len(queue)} entries left in the journal"
                ) from exc
            logger.error("replay: server refused %d entries of run %s: %s", len(batch), header.run_id, _one_line(exc))
            replayer.result.rejected += len(batch)
            replayer.model_rejected |= bool(batch[0].get("model"))
        for _ in batch:
            done = queue.popleft()
            discard_spool(done)
        since_save += len(batch)
        if queue and (since_save >= 5000 or not any(k in batch[0] for k in ("m", "p", "t"))):
            write_journal(path, header, queue)
            since_save = 0
    path.unlink(missing_ok=True)
    logger.info("replayed %s: run %s ended %s", path, header.run_id, replayer.result.status)
    return replayer.result
