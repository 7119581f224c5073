"""The background sender: one thread per run that delivers its journal from the cursor, in order.

:class:`RunSender` is the tracker's one writer. A logging call appends its entries to the
run's journal (:mod:`plantml.tracking.journal`) and returns; the training step never waits
on the network. The sender thread takes records from the front of the journal, packs
consecutive params, metrics and tags into one ``log_batch`` request up to MLflow's limits
(1000 metrics, 100 params, 100 tags, 1000 entries, about 1 MB), sends an artifact, a
model or the run's end alone, and moves the cursor once the server has them
(:func:`plantml.tracking.delivery.deliver`: one retry policy, exactly once, refusals
narrowed down to the entries at fault and set aside).

A part-filled batch lingers up to ``linger_s`` (like Kafka's ``linger.ms``) for company:
fewer, fuller requests while training; a flush, an epoch's end or the run's end sends at
once. The thread also fsyncs the journal at most about once a second, and sets the
heartbeat tag about once a minute. It never dies: whatever goes wrong is logged, retried
and, if the run ends first, left in the journal for recovery.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from plantml.errors import TrackingError, one_line
from plantml.tracking.batches import describe, discard_spooled, take_batch
from plantml.tracking.delivery import RetryPolicy, deliver
from plantml.tracking.entries import End, Entry, Model, Record, SetAside, Tag
from plantml.tracking.journal import COMPACT_AT, Journal
from plantml.tracking.journal_io import journal_dir
from plantml.tracking.transport import (
    DEFAULT_REQUEST_TIMEOUT_S,
    REJECTED_TAG,
    ModelProgressBook,
    Refused,
    RunGone,
    Transport,
)
from plantml.tracking.validation import (
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
)

logger = logging.getLogger(__name__)

#: Tag holding the time the run's process was last seen alive (UTC, ISO 8601).
HEARTBEAT_TAG = "plantml.heartbeat"
HEARTBEAT_INTERVAL_S = 60.0
#: The journal is fsynced at most this often between explicit syncs.
SYNC_INTERVAL_S = 1.0


class DeliveryPending(TrackingError):
    """end_run gave up waiting: what was not delivered stays in the run's journal, for recovery."""

    def __init__(self, message: str, journal: Path) -> None:
        super().__init__(message)
        self.journal = journal


@dataclass(frozen=True)
class DeliverySettings:
    """How the sender waits, buffers and retries. Resolved by :func:`resolve_delivery_settings`."""

    timeout_s: float = 60.0
    max_in_memory: int = 100_000
    max_backoff_s: float = 5.0
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    journal_dir: Path = field(default_factory=journal_dir)
    linger_s: float = 1.0
    #: Seconds a run ended by a signal waits for delivery before leaving the rest to recovery.
    signal_timeout_s: float = 10.0
    #: Bytes a run's journal grows by before it is written again without what the server has.
    journal_compact_bytes: int = COMPACT_AT


def resolve_delivery_settings(
    timeout_s: float | None = None,
    max_in_memory: int | None = None,
    journal_folder: str | os.PathLike[str] | None = None,
    *,
    max_backoff_s: float | None = None,
    request_timeout_s: float | None = None,
) -> DeliverySettings:
    """Argument, then the ``PLANTML_*`` variable, then the default, for each delivery setting."""
    from plantml.settings import env_number

    return DeliverySettings(
        timeout_s=env_number("PLANTML_DELIVERY_TIMEOUT", timeout_s, minimum=0),
        max_in_memory=env_number("PLANTML_MAX_BUFFERED", max_in_memory, int, minimum=1),
        max_backoff_s=env_number("PLANTML_MAX_BACKOFF", max_backoff_s, minimum=0, above=True),
        request_timeout_s=env_number("PLANTML_REQUEST_TIMEOUT", request_timeout_s, minimum=0, above=True),
        journal_dir=journal_dir(journal_folder),
        linger_s=env_number("PLANTML_LINGER", minimum=0),
        signal_timeout_s=env_number("PLANTML_SIGNAL_TIMEOUT", minimum=0),
        journal_compact_bytes=int(env_number("PLANTML_JOURNAL_COMPACT_MB", minimum=0, above=True) * (1 << 20)),
    )


def heartbeat_value(now: float | None = None) -> str:
    """The heartbeat tag's value for ``now``: UTC, ISO 8601, to the second."""
    return datetime.fromtimestamp(now or time.time(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunSender:
    """One run's write path: its journal, and the thread that delivers it."""

    def __init__(self, transport: Transport, journal: Journal, settings: DeliverySettings, run_id: str,
                 recovering: bool = False) -> None:
        self.transport = transport
        self.recovering = recovering  # delivering a journal left behind: any record may have arrived already
        self.journal = journal
        self.settings = settings
        self.run_id = run_id
        self.rejected: list[SetAside] = []
        self.gone: RunGone | None = None
        self.last_error: str | None = None
        self.in_flight: str | None = None  # what the thread is delivering now, in words
        self.failures = 0  # tries failed in a row (the log says how long an outage lasts)
        self.failed_tries = 0  # tries failed in all, for this run
        self.delivered = 0
        self.already_stored = 0
        self.model_versions: list[int] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._flushing = 0
        self._sync_requested = False
        self._waiting_since: float | None = None
        self._waiters: dict[int, Future[Any]] = {}
        self._last_heartbeat = time.monotonic()
        self._exited = False  # the thread is over: nothing more it does needs the journal
        self._close_on_exit = False
        self._book = ModelProgressBook(journal.model_progress, journal.record_progress)
        self._thread = threading.Thread(target=self._run, name=f"plantml-sender-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- the producer side: never touches the network ---------------------------------------------

    def write(self, entries: list[Entry], keep_if_refused: bool = False) -> list[Record]:
        """Journal ``entries`` and wake the sender; :class:`JournalWriteError` if the disk refuses."""
        records = self.journal.append(entries, keep_if_refused)
        with self._cond:
            if self._waiting_since is None:
                self._waiting_since = time.monotonic()
            self._cond.notify_all()
        return records

    def write_model(self, model: Model) -> Future[Any]:
        """Journal a spooled model; the future gives its ModelInfo once stored (and registered)."""
        future: Future[Any] = Future()
        with self._cond:  # registered before the sender can see the record
            [record] = self.write([model])
            self._waiters[record.seq] = future
        return future

    def request_sync(self) -> None:
        """Ask for an fsync of the journal soon (an epoch ended: a power cut would lose at most the epoch)."""
        with self._cond:
            self._sync_requested = True
            self._cond.notify_all()

    # -- waiting -------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None, hurry: Callable[[], bool] = lambda: False, to_the_end: bool = False) -> bool:
        """Wait until everything journalled so far is settled; False if ``timeout`` (or ``hurry``) came first.

        ``to_the_end``: also what is journalled while waiting (the count of set-aside entries, after the run's end).
        """
        target = self.journal.last_seq
        deadline = None if timeout is None else time.monotonic() + timeout
        self.journal.sync()
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()  # a lingering batch leaves now
            try:
                while self.journal.cursor < (self.journal.last_seq if to_the_end else target):
                    left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                    if left <= 0 or self.gone is not None or hurry() or not self._thread.is_alive():
                        return False
                    self._cond.wait(left)
            finally:
                self._flushing -= 1
        return True

    def finish(self, end: End, timeout: float, hurry: Callable[[], bool] = lambda: False) -> bool:
        """Journal the run's end (kept in memory if the disk refuses) and wait up to ``timeout`` for delivery."""
        self.write([end], keep_if_refused=True)
        return self.flush(timeout, hurry, to_the_end=True)

    def stop(self) -> None:
        """Stop the thread after its current request; what is not delivered stays in the journal."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(DeliveryPending(f"run {self.run_id}: model not delivered", self.journal.path))

    def release(self, wait: float = 1.0) -> None:
        """Stop the thread; close the journal once its request in flight (an upload: minutes) is over. Until
        then the journal stays locked, so what that request achieves (the cursor, a model's progress) is
        journalled before its spool goes, and a replay meanwhile finds it in use instead of sending it twice."""
        self.stop()
        self._thread.join(wait)
        with self._cond:
            if not self._exited:
                self._close_on_exit = True
                return
        self.journal.close()

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = self._next_batch()
                    if batch:
                        self._deliver(batch)
                except Exception as exc:  # a bug or a disk error: log it, never die, try again shortly
                    self._note_failure(exc, self.failures + 1)
                    self._stop.wait(1.0)
        finally:
            with self._cond:
                self._exited = True
                close = self._close_on_exit
            if close:
                self.journal.close()

    def _next_batch(self) -> list[Record]:
        while not self._stop.is_set():
            self._housekeeping()  # outside the lock: a producer never waits on an fsync or a request
            with self._cond:
                linger = self._linger_left()
                if self.gone is None and self.journal.has_pending() and linger <= 0:
                    return take_batch(self.journal.pending(MAX_ENTITIES_PER_BATCH))
                self._cond.wait(min(SYNC_INTERVAL_S, linger) if linger > 0 else SYNC_INTERVAL_S)
        return []

    def _housekeeping(self) -> None:
        """fsync about once a second (at once when asked), heartbeat about once a minute."""
        with self._cond:
            requested, self._sync_requested = self._sync_requested, False
        self.journal.sync(0.0 if requested else SYNC_INTERVAL_S)
        if time.monotonic() - self._last_heartbeat >= HEARTBEAT_INTERVAL_S and self.gone is None and not self.recovering:
            self._last_heartbeat = time.monotonic()
            try:  # one quick try: a missed beat only makes the run look older to `recover --stale`
                self.transport.log_batch(self.run_id, [], [], [Tag(HEARTBEAT_TAG, heartbeat_value())])
            except Exception as exc:
                logger.debug("heartbeat of run %s not sent: %s", self.run_id, one_line(exc))

    def _linger_left(self) -> float:
        """Seconds the front batch may still wait for company (0: send it now). Called under the lock."""
        if self._flushing or self._waiting_since is None or not self.settings.linger_s:
            return 0.0
        front = self.journal.pending(MAX_METRICS_PER_BATCH)
        if len(front) >= MAX_METRICS_PER_BATCH or not all(record.is_log for record in front):
            return 0.0  # a full batch, or an artifact, a model or the end waits behind: go
        return self._waiting_since + self.settings.linger_s - time.monotonic()

    def _deliver(self, batch: list[Record]) -> None:
        policy = RetryPolicy(self.settings.max_backoff_s, give_up=self._stop.is_set, sleep=self._stop.wait,
                             on_failure=self._note_failure)
        model_refused = any(isinstance(aside.record.entry, Model) for aside in self.rejected)
        self.in_flight = describe(batch[0]) if len(batch) == 1 else f"a batch of {len(batch)} params, metrics and tags"
        try:
            outcome = deliver(self.transport, self.run_id, batch, policy, self._book, model_refused,
                              maybe_sent=self.recovering, grow=self._front_batch)
        except RunGone as exc:
            logger.warning("%s: what it logs is kept in %s", exc, self.journal.path)
            with self._cond:
                self.gone = exc
                self._cond.notify_all()
            return
        except Exception:
            if self._stop.is_set():
                return  # stopped mid-retry: the journal keeps the batch
            raise
        self.in_flight = None
        if self.failures:
            logger.info("tracking delivery resumed after %d failed tries", self.failures)
            self.failures = 0
        for aside in outcome.set_aside:
            self._set_aside(aside)
        if outcome.set_aside:  # counted on the run (every set-aside the journal records), delivered like any tag
            self.journal.append([Tag(REJECTED_TAG, str(len(self.journal.refused)))], keep_if_refused=True)
        self.journal.ack(max(r.seq for r in [*outcome.delivered, *(a.record for a in outcome.set_aside)]))
        self.delivered += len(outcome.delivered)
        self.already_stored += outcome.already_stored
        for record in outcome.delivered:
            if isinstance(record.entry, Model):
                self._resolve(record.seq, result=outcome.model_info)
                version = getattr(outcome.model_info, "registered_model_version", None)
                if version is not None:
                    self.model_versions.append(int(version))
        discard_spooled(outcome.delivered)
        with self._cond:
            if not self.journal.has_pending():
                self._waiting_since = None
            self._cond.notify_all()

    def _front_batch(self, batch: list[Record]) -> list[Record]:
        """The batch at the front of the journal now: ``batch`` and what was logged since behind it."""
        front = take_batch(self.journal.pending(MAX_ENTITIES_PER_BATCH))
        return front if front[: len(batch)] == batch else batch

    def _set_aside(self, aside: SetAside) -> None:
        logger.warning("%s refused for run %s, set aside: %s",
                       describe(aside.record), self.run_id, aside.reason)
        self.rejected.append(aside)
        self.journal.set_aside(aside.record, aside.reason)
        if isinstance(aside.record.entry, Model):
            self._resolve(aside.record.seq, error=Refused(f"model {aside.record.entry.name!r} refused: {aside.reason}"))

    def _resolve(self, seq: int, result: Any = None, error: BaseException | None = None) -> None:
        with self._cond:
            future = self._waiters.pop(seq, None)
        if future is not None and not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def _note_failure(self, exc: BaseException, attempt: int) -> None:
        self.failures += 1
        self.failed_tries += 1
        self.last_error = self.transport.failure_reason(exc)
        log = logger.warning if self.failures in (1, 10) or self.failures % 50 == 0 else logger.debug
        log("tracking delivery failed (try %d), retrying: %s", self.failures, self.last_error)
