"""The tracker's one active run: made, written to and ended here, so ``tracker.py`` stays the API.

An :class:`ActiveRun` ties a run id to its writer (a :class:`~plantml.tracking.sender.RunSender`
over the run's journal), the spool its files are copied into, and the params it has logged
(MLflow's params are immutable: a changed value is refused at the call).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from plantml.errors import UsageError, ValidationError
from plantml.settings import TrackingSettings
from plantml.tracking import signals
from plantml.tracking.entries import End, Entry, Param
from plantml.tracking.journal import Journal
from plantml.tracking.journal_format import JournalHeader
from plantml.tracking.recover import EndReport, finish_run
from plantml.tracking.runs import error_tags
from plantml.tracking.sender import DeliverySettings, RunSender
from plantml.tracking.spool import Spool
from plantml.tracking.transport import Transport


@dataclass
class ActiveRun:
    """One run being logged: its id, writer and spool, and what it has logged as params."""

    run_id: str
    sender: RunSender
    spool: Spool
    signals: bool
    params: dict[str, str] = field(default_factory=dict)
    #: The process that started the run: the journal's sender thread and locks exist in that process only.
    pid: int = field(default_factory=os.getpid)
    _params_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, run_id: str, settings: TrackingSettings, delivery: DeliverySettings, client: Any,
             experiment_id: str, use_signals: bool) -> ActiveRun:
        """The journal, writer and spool of the new run ``run_id``.

        Raises :class:`~plantml.errors.TrackingError` when the journal cannot be created
        (the caller ends the run FAILED).
        """
        header = JournalHeader.for_this_process(run_id, settings.tracking_uri, experiment_id)
        journal = Journal.create(delivery.journal_dir, header, delivery.max_in_memory, delivery.journal_compact_bytes)
        # each run its own transport: a sender left behind by an earlier run never shares its connection
        transport = Transport(settings, client, experiment_id, delivery.request_timeout_s)
        return cls(run_id, RunSender(transport, journal, delivery, run_id), Spool.of_run(delivery.journal_dir, run_id), use_signals)

    @property
    def forked(self) -> bool:
        """True in a process forked from the one that started the run: nothing it logs would be sent, and
        a lock another thread held at the fork stays held for good (a log call would hang)."""
        return self.pid != os.getpid()

    def owned(self) -> ActiveRun:
        """This run, or a one-line UsageError in a forked process."""
        if self.forked:
            raise UsageError(f"run {self.run_id} belongs to process {self.pid}, not to this one forked from it: "
                             "log from that process, or start_run() one of its own here")
        return self

    def write(self, entries: list[Entry]) -> None:
        """Journal ``entries`` for delivery; a signal never cuts the append in half."""
        if entries:
            with signals.deferred():
                self.sender.write(entries)

    def write_params(self, params: Mapping[str, str]) -> None:
        """Journal those of ``params`` (checked text values) not logged yet; a changed value is refused, also
        when two threads log the same param at once (checked and journalled under one lock)."""
        with self._params_lock:
            new = self._new_params(params)
            self.write([Param(key, value) for key, value in new.items()])
            self.params.update(new)

    def _new_params(self, params: Mapping[str, str]) -> dict[str, str]:
        new: dict[str, str] = {}
        for key, text in params.items():
            logged = self.params.get(key)
            if logged is not None and logged != text:
                raise ValidationError(f"param {key!r}: already logged as {logged!r} in run {self.run_id}, cannot change it to {text!r}")
            if logged is None:
                new[key] = text
        return new

    def finish(self, status: str, timeout: float, error: BaseException | None) -> EndReport:
        """Record ``error`` as tags, end the run with ``status`` and wait up to ``timeout`` for delivery."""
        if error is not None:
            self.sender.write(error_tags(error), keep_if_refused=True)
        hurry = signals.hurry if self.signals else (lambda: False)
        return finish_run(self.sender, self.spool, End(status, int(time.time() * 1000)), timeout, hurry)

