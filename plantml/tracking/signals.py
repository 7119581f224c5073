"""SIGTERM, SIGHUP and SIGINT end a tracked run KILLED, not the process mid-sentence.

Opt-in (``MLflowTracker(handle_signals=True)`` or ``start_run(handle_signals=True)``;
``plantml train`` turns it on). While installed, the first of these signals raises
:class:`~plantml.errors.Interrupted` (a ``KeyboardInterrupt``) in the main thread, so the
training loop unwinds and the run is ended KILLED, after delivering what is pending
within ``PLANTML_SIGNAL_TIMEOUT`` seconds (10); what is still undelivered then stays in
the run's journal for recovery. A second signal cuts that wait short.

The tracker's own critical moments (a journal append, the end of a run) run inside
:func:`deferred`: a signal arriving there is raised when they are done, never in the
middle. If nothing catches the exception, one line goes to stderr and the process ends
by the same signal, so its exit status names it (128 + the signal's number), with no
traceback. A process forked from this one (a DataLoader worker) gets the default
behaviour.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from plantml.errors import Interrupted

HANDLED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
#: After an interruption, further signals only hurry the exit for this long (then the handlers before ours act).
AFTER_INTERRUPT_S = 30.0


class _State:
    """What the handler knows; one per process (signal handlers are process-wide)."""

    def __init__(self) -> None:
        self.installed = 0  # how many runs asked for the handlers (they nest)
        self.previous: dict[int, Any] = {}
        self.owner_pid = 0
        self.current: Interrupted | None = None
        self.count = 0
        self.depth = 0  # inside deferred() sections of the main thread
        self.pending = False  # received inside a deferred() section, to raise on leaving it
        self.hook_installed = False
        self.lingering_until = 0.0  # ours stay after the last uninstall, when it came during an interruption
        self.exiting = False  # the process is ending (uncaught interruption, atexit, the command line's exit)
        self.on_uncaught: list[Callable[[Interrupted], None]] = []


_state = _State()


def install() -> None:
    """Route the three signals to :class:`Interrupted` (nests: each install needs an uninstall)."""
    if threading.current_thread() is not threading.main_thread():
        from plantml.errors import UsageError

        raise UsageError("handle_signals needs the main thread (Python delivers signals only there)")
    if _state.installed == 0:
        _state.owner_pid = os.getpid()
        _state.current, _state.count, _state.pending, _state.exiting = None, 0, False, False
        if not _state.previous:  # (still there when ours linger after an interruption)
            _state.previous = {signum: signal.signal(signum, _handler) for signum in HANDLED}
    _state.installed += 1
    if not _state.hook_installed:  # kept for good: the exception may reach the top after the run ended
        _state.hook_installed = True
        previous_hook = sys.excepthook
        sys.excepthook = lambda kind, exc, tb: _excepthook(previous_hook, kind, exc, tb)
        atexit.register(exiting)  # registered after open_runs' hook, so it runs before it


def uninstall() -> None:
    """Undo one :func:`install`; the last one restores the previous handlers.

    Not at once after an interruption: the process may be on its way out, and a second Ctrl-C
    a moment later must not turn into a traceback. For ``AFTER_INTERRUPT_S`` seconds,
    while the interruption is still being handled (unwinding, an ``except`` block) or the
    process is :func:`exiting`, further signals only hurry. Any other signal (a notebook or
    an application that caught the interruption and went on) gets the previous handler,
    which is restored then.
    """
    if _state.installed == 0:
        return
    _state.installed -= 1
    if _state.installed == 0:
        if _state.current is not None:
            _state.lingering_until = time.monotonic() + AFTER_INTERRUPT_S
        elif threading.current_thread() is threading.main_thread():
            _restore()


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """:func:`install` for the duration of a ``with`` block (a command's work before any run exists)."""
    install()
    try:
        yield
    finally:
        uninstall()


def reset() -> None:
    """Forget an interruption and give the signals back to the handlers before ours, at once
    (an interactive session that caught the :class:`Interrupted` and goes on)."""
    if _state.installed == 0 and threading.current_thread() is threading.main_thread():
        _state.current, _state.count, _state.lingering_until, _state.exiting = None, 0, 0.0, False
        _restore()


def _restore() -> None:
    for signum, previous in _state.previous.items():
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _state.previous = {}


def exiting() -> None:
    """Say the process is ending: a signal shortly after an interruption only hurries it (see :func:`uninstall`)."""
    _state.exiting = True


def _lingering() -> bool:
    """Whether ours still hold after the last uninstall: soon after an interruption, while the process
    unwinds it or exits (rather than went on after catching it)."""
    unwinding = sys.exc_info()[0] is not None
    return time.monotonic() <= _state.lingering_until and (unwinding or _state.exiting)


def received() -> Interrupted | None:
    """The interruption being handled (the first signal) while a run handles signals, or None.

    An interruption an earlier run got and its caller caught is not news to a later training
    that fails without handling signals: its error is (it was reported as that old stop).
    """
    return _state.current if _state.installed else None


def hurry() -> bool:
    """True once a second signal came: stop waiting for delivery."""
    return _state.count > 1


def on_uncaught(callback: Callable[[Interrupted], None]) -> None:
    """Call ``callback`` before the process ends on an :class:`Interrupted` nothing caught."""
    if callback not in _state.on_uncaught:
        _state.on_uncaught.append(callback)


class deferred:  # noqa: N801 - used as ``with deferred():``, like contextlib's helpers
    """A section of the main thread that a signal does not interrupt; it is raised on leaving."""

    __slots__ = ("active",)

    def __enter__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            _state.depth += 1

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if not self.active:
            return
        _state.depth -= 1
        if _state.depth == 0 and _state.pending:
            _state.pending = False
            raise _state.current  # type: ignore[misc]


def _handler(signum: int, frame: Any) -> None:
    if os.getpid() != _state.owner_pid:  # a forked child: what it would do without us
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _state.installed == 0 and not _lingering():
        previous = _state.previous.get(signum, signal.SIG_DFL)  # no run handles signals any more: as before us
        _restore()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)
        return
    _state.count += 1
    if _state.current is not None:
        return  # a second signal: hurry() says so to whoever waits
    _state.current = Interrupted(signum)
    if _state.depth:
        _state.pending = True
        return
    raise _state.current


def _excepthook(previous: Callable[..., Any], kind: type, exc: BaseException, tb: Any) -> None:
    if not isinstance(exc, Interrupted) or os.getpid() != _state.owner_pid:
        previous(kind, exc, tb)
        return
    _state.exiting = True
    for callback in list(_state.on_uncaught):
        try:
            callback(exc)
        except Exception:  # the process is ending: say what we can, then go
            pass
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    sys.stderr.write(f"{program}: {exc}\n")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    signal.signal(exc.signum, signal.SIG_DFL)  # end by the signal itself: the exit status names it
    os.kill(os.getpid(), exc.signum)
