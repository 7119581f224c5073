"""Runs whose process is gone: deliver their journals exactly once, end them, say so.

A run's journal (:mod:`plantml.tracking.journal`) outlives its process. Recovery opens
it (taking its lock: a live writer or another recovery holds it), checks the run on the
server, appends what the process never could (a ``plantml.recovered`` tag and, without
an end in the journal, ``End(KILLED)``), then delivers everything after the cursor with a
:class:`~plantml.tracking.sender.RunSender` like any run, every record read back first
(it may have arrived before the process died). Then the journal is removed; one that
holds refused entries or corrupt lines is kept (moved to ``kept/`` when found by a scan),
and the report says why.

Guards: a run deleted on the server is a one-line error, journal kept; a run that has
already ended with its delivery complete (``plantml.delivery=complete``) is never changed
by a stale copy of its journal. :func:`recover_orphans` finds journals whose process is
gone from this machine (pid and process start time) and whose lock is free;
:func:`end_stale_runs` ends RUNNING runs whose heartbeat tag is older than a duration
(processes that died on another machine). A new tracker and ``plantml train`` recover the
journals left for their server at start, in bounded time; :func:`finish_run` is how a
live run ends, shared with recovery.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from plantml.errors import TrackingError, UsageError, connection_reason, one_line
from plantml.settings import TrackingSettings, parse_duration, resolve_tracking_settings
from plantml.tracking.delivery import RetryPolicy, read_run_state
from plantml.tracking.entries import End, Model, Tag
from plantml.tracking.journal import Journal, JournalBusy
from plantml.tracking.journal_format import JournalHeader
from plantml.tracking.journal_io import list_journals, read_header
from plantml.tracking.sender import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_TAG,
    DeliveryPending,
    DeliverySettings,
    RunSender,
    heartbeat_value,
    resolve_delivery_settings,
)
from plantml.tracking.spool import Spool
from plantml.tracking.stores import all_experiments, open_client, same_store, search_batches
from plantml.tracking.transport import DELIVERY_TAG, Transport, end_status

logger = logging.getLogger(__name__)

RECOVERED_TAG = "plantml.recovered"
JOURNAL_TAG = "plantml.delivery.journal"
REQUESTED_STATUS_TAG = "plantml.delivery.requested_status"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
#: Seconds recovery tries to reach a journal's server before it keeps the journal and moves on.
FIRST_CONTACT_S = 15.0


@dataclass(frozen=True)
class EndReport:
    """How a run's end went: a line to show, and the error ``end_run`` raises (None: all delivered)."""

    run_id: str
    message: str
    journal: Path | None = None
    error: TrackingError | None = None
    #: The status the run ended with (FAILED where FINISHED was asked and a model was refused); None: not ended.
    status: str | None = None


@dataclass(frozen=True)
class RecoverReport:
    """What recovering one journal did."""

    journal: Path
    run_id: str
    message: str
    ok: bool
    status: str | None = None
    delivered: int = 0
    already_stored: int = 0
    refused: tuple[str, ...] = ()
    skipped_lines: tuple[str, ...] = ()
    model_versions: tuple[int, ...] = ()
    #: The journal's server could not be reached: the other journals for it need not try again now.
    unreachable: bool = False


def finish_run(sender: RunSender, spool: Spool, end: End, timeout: float, hurry: Any = lambda: False,
               move_kept: bool = True) -> EndReport:
    """Journal ``end`` (unless the journal has one), wait up to ``timeout`` for delivery, then remove,
    keep or release the journal."""
    run_id, journal = sender.run_id, sender.journal
    if journal.requested_end is None:
        done = sender.finish(end, timeout, hurry)
    else:
        end = journal.requested_end
        done = sender.flush(timeout, hurry, to_the_end=True)
    sender.stop()
    if done:
        end = replace(end, status=end_status(end.status, any(isinstance(a.record.entry, Model) for a in sender.rejected)))
        if not journal.refused and not journal.problems:
            journal.remove()
            spool.remove()
            return EndReport(run_id, f"run {run_id} ended {end.status}, everything delivered", status=end.status)
        if move_kept:
            kept = journal.keep_aside()
        else:
            journal.close()
            kept = journal.path
        message = (f"run {run_id} ended {end.status}; {len(journal.refused)} entries the server refused "
                   f"were set aside, {len(journal.problems)} corrupt journal lines skipped; see {kept}")
        logger.warning("%s", message)
        return EndReport(run_id, message, kept, status=end.status)
    if sender.gone is not None:
        journal.close()
        message = f"{sender.gone}; what the run logged is kept in {journal.path}"
        return EndReport(run_id, message, journal.path, TrackingError(message))
    waited_for = sender.in_flight
    marked = _mark_pending(sender, end, hurry())
    sender.release(0.0 if hurry() else 1.0)  # a request still in flight journals its outcome before the lock goes
    why = sender.last_error or (f"no answer in time for {waited_for}" if waited_for else "no answer in time")
    message = (f"run {run_id}: not everything was delivered to {sender.transport.settings.tracking_uri} ({why}); "
               f"{marked}; the rest is kept in {journal.path}: `plantml tracking replay {shlex.quote(str(journal.path))}` "
               f"(or `plantml tracking recover` once this process has ended) delivers it")
    return EndReport(run_id, message, journal.path, DeliveryPending(message, journal.path))


def _mark_pending(sender: RunSender, end: End, hurry: bool) -> str:
    """One quick try: tag the run pending and give it its status (FAILED instead of FINISHED) until recovered."""
    status = "FAILED" if end.status == "FINISHED" else end.status
    quick = Transport(sender.transport.settings, sender.transport.client, sender.transport.experiment_id,
                      1.0 if hurry else min(3.0, sender.transport.timeout))
    quick.lock_wait = quick.timeout  # the sender thread may hold MLflow's settings through a hung upload
    try:
        quick.log_batch(sender.run_id, [], [], [Tag(DELIVERY_TAG, "pending"), Tag(JOURNAL_TAG, str(sender.journal.path)[:5000]),
                                                Tag(REQUESTED_STATUS_TAG, end.status)])
        quick.terminate(sender.run_id, status, end.at)
    except Exception as exc:  # the server is away: the journal has the end, recovery sets it
        return f"the run could not be marked {status} ({one_line(exc)})"
    return f"the run is marked {status} until then"


def recover_journal(path: Path, settings: TrackingSettings | None = None, delivery: DeliverySettings | None = None, *,
                    timeout: float = 300.0, status: str = "KILLED", move_kept: bool = False,
                    why: str = "recovered", idle: bool = False) -> RecoverReport:
    """Deliver the journal at ``path`` and end its run; see the module docstring.

    ``settings`` names the server (default: the journal's, with credentials from the
    environment or ``.env``); ``status`` ends a run whose journal asked for none.
    ``timeout`` bounds the whole delivery, or with ``idle`` only a time without progress
    (the server or the object store away), however long a steady delivery takes.
    :class:`JournalBusy` when its writer (or another recovery) holds it.
    """
    delivery = replace(delivery or resolve_delivery_settings(), linger_s=0.0)
    journal = Journal.open_existing(path, delivery.max_in_memory, delivery.journal_compact_bytes)
    header = journal.header
    try:
        settings = settings or resolve_tracking_settings(header.tracking_uri)
        try:  # a database URI whose server is down is one line in seconds (MLflow's store retries it for 100 s)
            client = open_client(settings.tracking_uri, settings.source_of("tracking_uri"), must_exist=False)
        except TrackingError as exc:
            journal.close()
            report = _report(journal, f"journal {path} (run {header.run_id}): {exc}; journal kept", False)
            return replace(report, unreachable=True)
        transport = Transport(settings, client, header.experiment_id, delivery.request_timeout_s)
        deadline = time.monotonic() + timeout
        policy = RetryPolicy(delivery.max_backoff_s, give_up=lambda: time.monotonic() > deadline)
        first_contact = time.monotonic() + min(timeout, FIRST_CONTACT_S)  # a server that is gone: move on soon
        try:
            state = read_run_state(transport, header.run_id, replace(policy, give_up=lambda: time.monotonic() > first_contact))
        except Exception as exc:
            journal.close()
            report = _report(journal, f"journal {path} (run {header.run_id}): {settings.tracking_uri} not reachable "
                                      f"({connection_reason(exc)}); journal kept", False)
            return replace(report, unreachable=True)
        if state is None or state.deleted:
            where = "deleted" if state else "not found"
            return _kept(journal, f"run {header.run_id} is {where} on {settings.tracking_uri}: nothing delivered", move_kept)
        if not journal.has_pending() and journal.requested_end and not journal.refused and not journal.problems:
            journal.remove()  # its writer died between the last delivery and removing it
            return _report(journal, f"run {header.run_id}: everything was delivered already", True, status=state.status)
        if state.status in TERMINAL and state.tags.get(DELIVERY_TAG) == "complete":
            return _kept(journal, f"run {header.run_id} already ended {state.status} with its delivery complete "
                                  "(is this a stale copy?): nothing changed", move_kept)
        note = f"{why} {heartbeat_value()} (journal of pid {header.pid} on {header.host or 'unknown host'})"
        journal.append([Tag(RECOVERED_TAG, note)], keep_if_refused=True)
        end = journal.requested_end or End(status, int(time.time() * 1000))
        sender = RunSender(transport, journal, delivery, header.run_id, recovering=True)
        stalled = _Stall(journal, sender, timeout) if idle else (lambda: False)
        report = finish_run(sender, Spool.of_run(delivery.journal_dir, header.run_id), end,
                            math.inf if idle else max(0.0, deadline - time.monotonic()), stalled, move_kept=move_kept)
    except BaseException:
        journal.close()
        raise
    refused = tuple(f"seq {seq}: {reason}" for seq, reason in sorted(journal.refused.items()))
    ok = report.error is None and not refused and not journal.problems
    counts = f"delivered {sender.delivered} entries ({sender.already_stored} already stored)"
    if report.error is not None:
        message = f"run {header.run_id}: {counts}; {one_line(report.error)}"
    else:
        message = f"run {header.run_id}: {counts}; ended {report.status}" + ("" if ok else f"; journal kept: {report.journal}")
    return RecoverReport(report.journal or journal.path, header.run_id, message, ok, status=report.status, delivered=sender.delivered,
                         already_stored=sender.already_stored, refused=refused, skipped_lines=journal.problems,
                         model_versions=tuple(sender.model_versions))


class _Stall:
    """True once the journal's cursor has not moved for ``seconds`` and a delivery try failed meanwhile.

    A long journal delivered at a steady pace goes on, however slow each request is on a
    loaded server; a server or object store away, or refusing, is given up on.
    """

    def __init__(self, journal: Journal, sender: RunSender, seconds: float) -> None:
        self.journal, self.sender, self.seconds = journal, sender, seconds
        self.cursor, self.since, self.failed = journal.cursor, time.monotonic(), sender.failed_tries

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.journal.cursor != self.cursor:
            self.cursor, self.since, self.failed = self.journal.cursor, now, self.sender.failed_tries
        return now - self.since > self.seconds and self.sender.failed_tries != self.failed


def _report(journal: Journal, message: str, ok: bool, status: str | None = None) -> RecoverReport:
    return RecoverReport(journal.path, journal.header.run_id, message, ok, status=status, skipped_lines=journal.problems)


def _kept(journal: Journal, message: str, move_kept: bool) -> RecoverReport:
    path = journal.keep_aside() if move_kept else journal.path
    journal.close()
    return _report(journal, f"{message}; journal kept: {path}", False)


def _headers(folder: Path) -> Iterator[tuple[Path, JournalHeader]]:
    """Each journal in ``folder`` with its header; a file that is not one (or went meanwhile) is passed over."""
    for path in list_journals(folder):
        try:
            yield path, read_header(path)
        except UsageError:
            continue  # not a journal: recovery reports it when asked for by name


def recover_orphans(folder: Path, *, tracking_uri: str | None = None) -> list[Path]:
    """Journals in ``folder`` whose writer process is gone from this machine (for ``tracking_uri`` only, if given)."""
    return [path for path, header in _headers(folder)
            if header.writer_gone() and (tracking_uri is None or same_store(header.tracking_uri, tracking_uri))]


def recover_at_start(delivery: DeliverySettings, settings: TrackingSettings, budget: float) -> list[RecoverReport]:
    """What a new tracker does first: deliver, within ``budget`` seconds, the journals dead processes left for its server."""
    deadline = time.monotonic() + budget
    reports = []
    for path in recover_orphans(delivery.journal_dir, tracking_uri=settings.tracking_uri):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            reports.append(recover_journal(path, settings, delivery, timeout=left, move_kept=True))
        except (JournalBusy, UsageError):
            continue  # another process is on it, or it vanished meanwhile
        except Exception as exc:  # never let an old journal stop a new run: `plantml tracking recover` says more
            logger.warning("journal %s not recovered: %s", path, one_line(exc))
            continue
        if reports[-1].unreachable:
            break  # every journal here is for that same server
    if reports:
        ended = ", ".join(f"{r.run_id} {'ended ' + r.status if r.status else 'not ended'}" for r in reports)
        logger.warning("recovered %d journal(s) left by processes that died: %s", len(reports), ended)
    return reports


def describe_orphan(path: Path) -> str:
    """What recovering ``path`` would do, in one line (for ``recover --dry-run``)."""
    header = read_header(path)
    writer = f"pid {header.pid} on {header.host} is gone" if header.version > 1 else "left by an older plantml"
    return f"would recover {path}: run {header.run_id} on {header.tracking_uri} ({writer})"


#: The shortest ``--stale``: a live run's heartbeat is up to a minute old (plus a busy
#: sender's delay), so a shorter duration would end runs that are still training.
MIN_STALE_S = 3 * HEARTBEAT_INTERVAL_S


def parse_stale(text: str) -> float:
    """``--stale``'s duration in seconds, refused when shorter than :data:`MIN_STALE_S` (it would end live runs)."""
    seconds = parse_duration(text)
    if seconds < MIN_STALE_S:
        raise UsageError(f"--stale {text!r}: shorter than {MIN_STALE_S / 60:.0f}m; live runs send their heartbeat "
                         f"once a minute, so it would end runs that are still training")
    return seconds


def live_run_ids(folder: Path) -> set[str]:
    """Runs whose journal in ``folder`` is still written by a process of this machine."""
    return {header.run_id for _, header in _headers(folder) if not header.writer_gone()}


@dataclass(frozen=True)
class StaleRun:
    """A RUNNING run whose heartbeat stopped."""

    run_id: str
    experiment_id: str
    heartbeat: str
    age_s: float


def end_stale_runs(settings: TrackingSettings, older_than_s: float, experiment_names: tuple[str, ...] = (),
                   dry_run: bool = False, status: str = "KILLED", journal_folder: Path | None = None) -> list[StaleRun]:
    """End ``status`` the RUNNING runs whose ``plantml.heartbeat`` is older than ``older_than_s`` seconds.

    A run whose journal in ``journal_folder`` a live process of this machine still writes
    is alive, whatever its heartbeat says (a sender waiting on a slow server), and is left alone.
    """
    client = open_client(settings.tracking_uri, settings.source_of("tracking_uri"), must_exist=False)
    try:
        if experiment_names:
            experiments = [client.get_experiment_by_name(name) for name in experiment_names]
            ids = [e.experiment_id for e in experiments if e is not None]
        else:
            ids = [e.experiment_id for e in all_experiments(client)]  # past the first page of 1,000 too
        stale = []
        now = time.time()
        live = live_run_ids(journal_folder) if journal_folder is not None else set()
        for run in _running_runs(client, ids):
            if run.info.run_id in live:
                continue
            beat = run.data.tags.get(HEARTBEAT_TAG)
            age = now - _parse_heartbeat(beat) if beat else None
            if age is not None and age > older_than_s:
                stale.append(StaleRun(run.info.run_id, run.info.experiment_id, beat, age))
        if not dry_run:
            for found in stale:
                note = f"heartbeat {found.heartbeat} older than {older_than_s:.0f} s; ended {heartbeat_value()}"
                client.set_tag(found.run_id, RECOVERED_TAG, note)
                client.set_terminated(found.run_id, status)
    except Exception as exc:
        raise TrackingError(f"{settings.tracking_uri}: looking for stale runs failed: {one_line(exc)}") from exc
    return stale


def _running_runs(client: Any, experiment_ids: list[str]) -> list[Any]:
    runs: list[Any] = []
    for batch in search_batches(experiment_ids):
        token = None
        while True:
            page = client.search_runs(batch, "attributes.status = 'RUNNING'",
                                      max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    return runs


def _parse_heartbeat(value: str) -> float:
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return time.time()  # unreadable: never counts as stale

