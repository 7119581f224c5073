"""The resilient write path: a bounded, ordered queue drained by one background sender.

:class:`BufferedWriter` is the tracker's default writer. Logging a param, metric, tag,
artifact or model only *enqueues* an entry (see :mod:`plantml.tracking.journal` for
their shape) and returns; the training step never waits on the network.

Queue
    Entries wait in memory, in the order they were logged, up to ``max_in_memory``
    (100,000 by default). Beyond that, while the server is away, new entries are appended
    to a spill file on disk, and read back in order once memory has room again: nothing
    is dropped, and memory stays bounded.

Sender
    One daemon thread per writer takes entries from the front of the queue. Consecutive
    params, metrics and tags of one run, whichever calls they came from, leave together
    in one ``log_batch`` request, up to MLflow's limits (1000 metrics, 100 params, 100
    tags, 1000 entries, about 1 MB); an artifact, a model or the run's end is sent alone,
    after everything logged before it. An entry leaves the queue only once the server
    has it.

Retries
    A failed request is retried by tenacity with capped exponential backoff (0.2 s
    doubling to ``max_backoff_s``, 5 s by default), for as long as it takes, while
    training continues. A refusal no retry can fix (a 4xx) is logged and recorded in
    :attr:`BufferedWriter.rejected` instead. Whether a retry may duplicate what the last
    try delivered, and how that is prevented, is explained in
    :mod:`plantml.tracking.delivery`.

End of a run
    :meth:`BufferedWriter.finish` queues the run's end (its status) behind everything
    else and waits up to ``timeout`` seconds for the queue to drain. If it does not, the
    sender is stopped, every undelivered entry (in flight, in memory, spilled) is written
    in order to a journal ``<journal_dir>/<run_id>.jsonl``, and the run is tagged
    ``plantml.delivery=pending`` and marked FAILED when the server can still be reached
    (otherwise it stays as it is). ``plantml tracking replay JOURNAL`` delivers the
    journal later and ends the run with the status that was asked for.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plantml.errors import ConfigError, TrackingError
from plantml.tracking.batching import _ENTRY_OVERHEAD, _REQUEST_SIZE_BUDGET, MetricPoint, _one_line
from plantml.tracking.delivery import DEFAULT_REQUEST_TIMEOUT_S, Delivery, discard_spool, is_permanent, surely_unsent
from plantml.tracking.journal import Entry, JournalHeader, SpillFile, journal_dir, new_journal_path, write_journal
from plantml.tracking.validation import MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

logger = logging.getLogger(__name__)

#: Tags that describe a run whose delivery is incomplete.
PENDING_TAG = "plantml.delivery"
JOURNAL_TAG = "plantml.delivery.journal"
REQUESTED_STATUS_TAG = "plantml.delivery.requested_status"

_LOG_KINDS = ("m", "p", "t")


class DeliveryPending(TrackingError):
    """end_run gave up waiting: what was not delivered is in a journal on disk, for ``plantml tracking replay``."""

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
    journal_dir: Path = Path("~/.cache/plantml/journal").expanduser()
    #: Seconds a part-filled batch of params, metrics and tags may wait for more before it
    #: leaves (like Kafka's linger.ms): fewer, fuller requests, less work for the server
    #: while training. A flush or the end of the run sends at once.
    linger_s: float = 1.0


def resolve_delivery_settings(
    timeout_s: float | None = None,
    max_in_memory: int | None = None,
    journal_folder: str | os.PathLike[str] | None = None,
    *,
    max_backoff_s: float | None = None,
    request_timeout_s: float | None = None,
) -> DeliverySettings:
    """Argument, then ``PLANTML_DELIVERY_TIMEOUT`` / ``PLANTML_MAX_BUFFERED`` / ``PLANTML_JOURNAL_DIR``, then the default."""

    from plantml.settings import env_number

    settings = DeliverySettings(
        timeout_s=env_number("PLANTML_DELIVERY_TIMEOUT", timeout_s),
        max_in_memory=env_number("PLANTML_MAX_BUFFERED", max_in_memory, int),
        max_backoff_s=env_number("PLANTML_MAX_BACKOFF", max_backoff_s),
        request_timeout_s=request_timeout_s or DEFAULT_REQUEST_TIMEOUT_S,
        journal_dir=journal_dir(journal_folder),
        linger_s=env_number("PLANTML_LINGER"),
    )
    if settings.timeout_s < 0 or settings.max_in_memory < 1 or settings.max_backoff_s <= 0 or settings.linger_s < 0:
        raise ConfigError(f"delivery settings out of range: {settings}")
    return settings


def metric_entries(run_id: str, metrics: Sequence[MetricPoint]) -> list[Entry]:
    return [{"run": run_id, "m": [m.key, m.value, m.timestamp, m.step]} for m in metrics]


def _entry_size(entry: Entry) -> int:
    if "m" in entry:
        return len(entry["m"][0]) + _ENTRY_OVERHEAD
    key, value = entry.get("p") or entry["t"]
    return len(key) + len(value) + _ENTRY_OVERHEAD


def take_batch(queue: Any) -> list[Entry]:
    """The entries at the front of ``queue`` that one request can carry, in order.

    An artifact, a model or an end goes alone. Otherwise consecutive params, tags and
    metrics of one run are taken up to MLflow's limits; a key repeated (a param, or a tag
    set twice) starts the next request, so the later value is sent later.
    """
    first = queue[0]
    if not any(kind in first for kind in _LOG_KINDS):
        return [first]
    batch: list[Entry] = []
    counts = {"m": 0, "p": 0, "t": 0}
    keys: set[tuple[str, str]] = set()
    size = 0
    for entry in itertools.islice(queue, MAX_ENTITIES_PER_BATCH):
        if entry["run"] != first["run"]:
            break
        kind = next((k for k in _LOG_KINDS if k in entry), None)
        if kind is None:
            break
        limit = MAX_METRICS_PER_BATCH if kind == "m" else MAX_PARAMS_TAGS_PER_BATCH
        entry_size = _entry_size(entry)
        if counts[kind] >= limit or (batch and size + entry_size > _REQUEST_SIZE_BUDGET):
            break
        if kind != "m":
            key = (kind, entry[kind][0])
            if key in keys:
                break
            keys.add(key)
        counts[kind] += 1
        size += entry_size
        batch.append(entry)
    return batch


_DONE, _REJECTED, _STOPPED = "done", "rejected", "stopped"


class BufferedWriter:
    """The tracker's write path: enqueue now, deliver in order in the background, exactly once."""

    def __init__(self, delivery: Delivery, settings: DeliverySettings | None = None) -> None:
        self._delivery = delivery
        self.settings = settings or resolve_delivery_settings()
        self._cond = threading.Condition()
        self._memory: deque[Entry] = deque()
        self._spill = SpillFile(self.settings.journal_dir / "spill" / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._flushing = 0  # callers waiting in flush(): no lingering while there are any
        self._waiting_since: float | None = None  # when the queue last went from empty to not
        self._waiters: dict[str, Future[Any]] = {}
        self.rejected: list[tuple[Entry, str]] = []
        self.last_error: str | None = None
        self.failures = 0

    @property
    def requests_sent(self) -> int:
        """Requests that reached the server (successful or not)."""
        return self._delivery.requests_sent

    def pending(self) -> int:
        """Entries not delivered yet (in memory and spilled)."""
        with self._cond:
            return len(self._memory) + self._spill.count

    def in_memory(self) -> int:
        """Entries waiting in memory."""
        with self._cond:
            return len(self._memory)

    # -- the producer side: never touches the network ---------------------------------------

    def write(self, run_id: str, metrics: Sequence[MetricPoint] = (), params: Sequence[tuple[str, str]] = (),
              tags: Sequence[tuple[str, str]] = ()) -> None:
        """Enqueue params, tags then metrics for ``run_id``; returns at once."""
        entries = [{"run": run_id, "p": [k, v]} for k, v in params]
        entries += [{"run": run_id, "t": [k, v]} for k, v in tags]
        entries += metric_entries(run_id, metrics)
        self._put(entries)

    def write_artifact(self, run_id: str, src: Path, artifact_path: str | None, is_dir: bool) -> None:
        """Enqueue the upload of a spooled file or folder (deleted once stored)."""
        self._put([{"run": run_id, "artifact": {"src": str(src), "dst": artifact_path, "dir": is_dir}}])

    def write_model(self, run_id: str, spec: dict[str, Any]) -> Future[Any]:
        """Enqueue a spooled model; the future gives its ModelInfo once stored (and registered)."""
        spec = {**spec, "id": uuid.uuid4().hex}
        future: Future[Any] = Future()
        with self._cond:
            self._waiters[spec["id"]] = future
        self._put([{"run": run_id, "model": spec}])
        return future

    def _put(self, entries: list[Entry]) -> None:
        if not entries:
            return
        with self._cond:
            if not self._memory and not self._spill.count:
                self._waiting_since = time.monotonic()
            room = self.settings.max_in_memory - len(self._memory)
            if self._spill.count == 0 and room > 0:
                self._memory.extend(entries[:room])
                entries = entries[room:]
            if entries:  # beyond the bound, or behind entries already on disk: keep the order
                self._spill.append(entries)
            self._ensure_sender()
            self._cond.notify_all()

    # -- waiting --------------------------------------------------------------------------------

    def flush(self, run_id: str | None = None, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is delivered; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()  # a lingering sender sends now
            try:
                while self._memory or self._spill.count:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left if left is not None else 1.0)
            finally:
                self._flushing -= 1
        return True

    def finish(self, run_id: str, status: str, timeout: float | None = None) -> Path | None:
        """Queue the run's end, wait up to ``timeout`` (the settings' by default) for delivery.

        Returns None once the server has everything and the run has its status; otherwise
        the path of the journal that now holds what is left (see the module docstring).
        """
        timeout = self.settings.timeout_s if timeout is None else timeout
        self._put([{"run": run_id, "end": status, "at": int(time.time() * 1000)}])
        if self.flush(run_id, timeout):
            return None
        return self._journal_rest(run_id, status)

    def close(self) -> None:
        """Stop the sender thread (what is still queued stays queued)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.request_timeout_s + 2)

    # -- giving up on a run -----------------------------------------------------------------------

    def _journal_rest(self, run_id: str, status: str) -> Path:
        thread = self._thread
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout=self.settings.request_timeout_s + 2)
        with self._cond:
            entries = list(self._memory) + self._spill.read_all()
            self._memory.clear()
            self._generation += 1  # a sender still stuck in a call must not pop what comes next
            self._stop = threading.Event()
            self._thread = None
            waiters, self._waiters = self._waiters, {}
        header = JournalHeader(run_id, self._delivery.settings.tracking_uri, self._delivery.experiment_id, time.time())
        path = write_journal(new_journal_path(self.settings.journal_dir, run_id), header,
                             [e for e in entries if e["run"] == run_id])
        others = [e for e in entries if e["run"] != run_id]
        if others:  # not expected (one run at a time), but never lost
            logger.warning("%d entries of other runs found while journalling run %s: journalling them too", len(others), run_id)
            for other_run in {e["run"] for e in others}:
                other_header = JournalHeader(other_run, header.tracking_uri, header.experiment_id, header.created)
                write_journal(new_journal_path(self.settings.journal_dir, other_run), other_header,
                              [e for e in others if e["run"] == other_run])
        for future in waiters.values():
            if not future.done():
                future.set_exception(DeliveryPending(f"run {run_id}: model not delivered; journal {path}", path))
        self._mark_pending(run_id, status, path)
        return path

    def _mark_pending(self, run_id: str, status: str, path: Path) -> None:
        """One quick try: tag the run as pending and mark it FAILED (never FINISHED) until replayed."""
        try:
            self._delivery.log_batch(run_id, [], [], [(PENDING_TAG, "pending"), (JOURNAL_TAG, str(path)[:5000]),
                                                      (REQUESTED_STATUS_TAG, status)])
            self._delivery.terminate(run_id, "FAILED")
        except Exception as exc:  # the server is away: the run stays as it is, the journal has it all
            logger.warning("run %s: could not mark it pending (%s); the journal %s has everything", run_id, _one_line(exc), path)

    # -- the sender thread ------------------------------------------------------------------------------

    def _ensure_sender(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, args=(self._stop, self._generation),
                                            name="plantml-sender", daemon=True)
            self._thread.start()

    def _run(self, stop: threading.Event, generation: int) -> None:
        while not stop.is_set():
            with self._cond:
                while not stop.is_set() and not self._memory and not self._spill.count:
                    self._cond.wait(1.0)
                while not stop.is_set() and (linger := self._linger_left()) > 0:
                    self._cond.wait(linger)
                if stop.is_set() or generation != self._generation:
                    return
                if self._spill.count and len(self._memory) < self.settings.max_in_memory // 2 + 1:
                    self._memory.extend(self._spill.read(self.settings.max_in_memory - len(self._memory)))
                batch = take_batch(self._memory)
            outcome = self._deliver(batch, stop)
            if outcome == _STOPPED:
                return
            with self._cond:
                if generation != self._generation:
                    return
                for _ in batch:
                    self._memory.popleft()
                self._cond.notify_all()
            if outcome == _DONE:
                for entry in batch:
                    discard_spool(entry)

    def _linger_left(self) -> float:
        """Seconds the front batch may still wait for company (0: send it now). Called under the lock.

        Only a part-filled batch of params, metrics and tags lingers, for at most
        ``linger_s`` after the queue stopped being empty, and never while someone flushes.
        """
        if self._flushing or self._spill.count or not self._memory or self._waiting_since is None:
            return 0.0
        if len(self._memory) >= MAX_METRICS_PER_BATCH:
            return 0.0  # a full batch (or a backlog) is ready
        if not all(any(kind in entry for kind in _LOG_KINDS) for entry in self._memory):
            return 0.0  # an artifact, a model or an end is waiting behind: go
        return self._waiting_since + self.settings.linger_s - time.monotonic()

    def _deliver(self, batch: list[Entry], stop: threading.Event) -> str:
        from tenacity import Retrying, retry_if_exception, wait_exponential

        state = {"maybe_sent": False}
        retrying = Retrying(
            retry=retry_if_exception(lambda exc: not is_permanent(exc)),
            wait=wait_exponential(multiplier=0.2, min=0.2, max=self.settings.max_backoff_s),
            stop=lambda retry_state: stop.is_set(),
            sleep=stop.wait,  # a stop request cuts the backoff short
            before_sleep=self._note_failure,
            reraise=True,
        )
        is_logs = any(kind in batch[0] for kind in _LOG_KINDS)
        try:
            for attempt in retrying:
                with attempt:
                    if is_logs and attempt.retry_state.attempt_number > 1:
                        # what was logged meanwhile joins the retry (up to the limits): the
                        # front of the queue is the same, and only this thread removes from it
                        with self._cond:
                            if self._memory:
                                batch[:] = take_batch(self._memory)
                    self._attempt(batch, state)
        except Exception as exc:
            if stop.is_set():
                return _STOPPED
            self._reject(batch, exc)
            return _REJECTED
        if self.failures:
            logger.info("delivery resumed after %d failed tries", self.failures)
            self.failures = 0
        return _DONE

    def _attempt(self, batch: list[Entry], state: dict[str, bool]) -> None:
        first = batch[0]
        run_id = first["run"]
        try:
            if "end" in first:
                status = "FAILED" if any(e.get("model") and e["run"] == run_id for e, _ in self.rejected) else first["end"]
                self._delivery.terminate(run_id, status, first.get("at"))
            elif "artifact" in first:
                self._delivery.upload(run_id, first["artifact"])
            elif "model" in first:
                info = self._delivery.deliver_model(run_id, first["model"])
                future = self._waiters.pop(first["model"]["id"], None)
                if future is not None and not future.done():
                    future.set_result(info)
            else:
                self._send_logs(run_id, batch, state["maybe_sent"])
        except Exception as exc:
            if not surely_unsent(exc):
                state["maybe_sent"] = True
            raise

    def _send_logs(self, run_id: str, batch: list[Entry], maybe_sent: bool) -> None:
        metrics = [MetricPoint(*e["m"]) for e in batch if "m" in e]
        params = [tuple(e["p"]) for e in batch if "p" in e]
        tags = [tuple(e["t"]) for e in batch if "t" in e]
        if maybe_sent:  # the last try may have been stored: send only what the server lacks
            metrics, params = self._delivery.unsent(run_id, metrics, params)
        if metrics or params or tags:
            self._delivery.log_batch(run_id, metrics, params, tags)  # type: ignore[arg-type]

    def _note_failure(self, retry_state: Any) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        self.failures += 1
        self.last_error = _one_line(exc) if exc else "unknown error"
        log = logger.warning if self.failures in (1, 10) or self.failures % 50 == 0 else logger.debug
        log("tracking delivery failed (try %d, %d entries waiting), retrying: %s",
            self.failures, len(self._memory) + self._spill.count, self.last_error)

    def _reject(self, batch: list[Entry], exc: BaseException) -> None:
        message = _one_line(exc)
        logger.error("tracking server refused %d entries for run %s, dropping them: %s", len(batch), batch[0]["run"], message)
        self.rejected.extend((entry, message) for entry in batch)
        model = batch[0].get("model")
        if model:
            future = self._waiters.pop(model["id"], None)
            if future is not None and not future.done():
                future.set_exception(TrackingError(f"model {model['name']!r} refused: {message}"))
