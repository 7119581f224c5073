"""Delivering a batch of journal records: one function, one retry policy, for every caller.

:func:`deliver` is the one delivery function: the sender, recovery and replay all call
it with a batch of records, a :class:`RetryPolicy` and what to do with a model's
progress. Underneath, :class:`~plantml.tracking.transport.Transport` makes one attempt
of one request.

One retry policy
    A failure is retried by tenacity with capped exponential backoff until the policy's
    ``give_up`` says stop (the sender: never while the run lasts; recovery: a deadline).
    A *refusal* is not retried: a 4xx (other than 408/429), a request the client cannot
    even build (a lone surrogate, a step beyond int64), or an HTTP 500 that repeats three
    times while the server answers a read of the same run (so the server is fine, and
    this request is what it cannot take). 502/503/504 mean "not now" and are retried.

Narrowing a refusal
    A refused batch is split in halves and each half delivered, down to the single
    entries the server refuses: those are set aside (the caller journals them and counts
    them on the run), everything else arrives. A refusal because the run itself is
    deleted or missing is :class:`RunGone` instead: nothing of the batch is set aside.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from plantml.errors import one_line
from plantml.tracking.entries import Record, SetAside
from plantml.tracking.transport import (
    ModelProgressBook,
    Refused,
    RunGone,
    RunState,
    ServerError,
    Transport,
    is_refusal,
    surely_unsent,
)

#: How many HTTP 500 answers in a row, with the server otherwise fine, make a refusal.
REPEATED_500 = 3


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry and when to stop: capped exponential backoff until ``give_up()`` says so."""

    max_backoff_s: float
    give_up: Callable[[], bool]
    sleep: Callable[[float], Any] = time.sleep
    on_failure: Callable[[BaseException, int], None] = lambda exc, attempt: None

    def retrying(self, retry_on: Callable[[BaseException], bool]) -> Any:
        """A tenacity ``Retrying`` for this policy, retrying the exceptions ``retry_on`` accepts."""
        from tenacity import Retrying, retry_if_exception, wait_exponential

        return Retrying(
            retry=retry_if_exception(retry_on),
            wait=wait_exponential(multiplier=0.2, min=0.2, max=self.max_backoff_s),
            stop=lambda retry_state: self.give_up(),
            sleep=self.sleep,
            before_sleep=lambda retry_state: self.on_failure(retry_state.outcome.exception(), retry_state.attempt_number),
            reraise=True,
        )


@dataclass
class Outcome:
    """What :func:`deliver` achieved for a batch."""

    delivered: list[Record] = field(default_factory=list)
    set_aside: list[SetAside] = field(default_factory=list)
    already_stored: int = 0
    model_info: Any = None


def deliver(transport: Transport, run_id: str, records: Sequence[Record], policy: RetryPolicy,
            progress: ModelProgressBook, model_refused: bool = False, maybe_sent: bool = False,
            grow: Callable[[list[Record]], list[Record]] | None = None) -> Outcome:
    """Deliver ``records`` with retries, narrowing a refusal down to the entries the server refuses.

    ``maybe_sent``: the records may have reached the server already (a recovery), so the
    first try reads back too. ``grow(batch)``, called before each retry of a log batch,
    may return it with what was logged meanwhile added behind (after an outage the first
    request then carries a full batch). Raises :class:`RunGone` when the run is deleted or
    missing, and the last error when ``policy.give_up()`` stopped the retries first.
    """
    state = {"maybe_sent": maybe_sent, "errors_500": 0}

    def attempt(batch: list[Record], grow_it: bool) -> tuple[int, Any]:
        if grow_it and grow is not None and batch[0].is_log:
            batch[:] = grow(batch)
        try:
            return transport.send(run_id, batch, state["maybe_sent"], progress, model_refused)
        except Exception as exc:
            if not surely_unsent(exc):
                state["maybe_sent"] = True
            if is_refusal(exc):
                raise Refused(one_line(exc)) from exc
            if isinstance(exc, ServerError) and exc.status == 500:
                state["errors_500"] += 1
                if state["errors_500"] >= REPEATED_500 and _answers_reads(transport, run_id):
                    raise Refused(f"{one_line(exc)} (repeated {state['errors_500']} times while the server answers reads)") from exc
            else:
                state["errors_500"] = 0
            raise

    outcome = Outcome()

    def narrow(batch: list[Record], top: bool) -> None:
        state["errors_500"] = 0
        tries = [0]

        def once() -> tuple[int, Any]:
            tries[0] += 1
            return attempt(batch, top and tries[0] > 1)

        try:
            already, info = policy.retrying(lambda exc: not isinstance(exc, Refused))(once)
        except Refused as exc:
            try:
                run = read_run_state(transport, run_id, policy)
            except Exception as unreadable:  # credentials, permissions: no entry is at fault, none is set aside
                if not is_refusal(unreadable):
                    raise
                raise RunGone(f"run {run_id} cannot be read on {transport.settings.tracking_uri}: {one_line(unreadable)}") from exc
            if run is None or run.deleted:
                where = "deleted" if run else "not found (no such run)"
                raise RunGone(f"run {run_id} is {where} on {transport.settings.tracking_uri}") from exc
            if len(batch) == 1:
                outcome.set_aside.append(SetAside(batch[0], str(exc)))
                return
            middle = len(batch) // 2
            narrow(batch[:middle], False)
            narrow(batch[middle:], False)
            return
        outcome.delivered.extend(batch)
        outcome.already_stored += already
        if info is not None:
            outcome.model_info = info

    narrow(list(records), True)
    return outcome


def _answers_reads(transport: Transport, run_id: str) -> bool:
    try:
        transport.run_state(run_id)
    except Exception:
        return False
    return True


def read_run_state(transport: Transport, run_id: str, policy: RetryPolicy) -> RunState | None:
    """The run's state, read with the retry policy; None when the server has no such run.

    A refusal (401, 403) is raised: the run exists, or may, but cannot be read.
    """
    return policy.retrying(lambda exc: not is_refusal(exc))(transport.run_state, run_id)
