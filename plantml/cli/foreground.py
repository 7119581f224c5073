"""Commands that run in the foreground until stopped (``stack up``, ``ui``): the stop signals as Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

#: Each stops a foreground command. SIGHUP: a closed terminal or a dropped ssh; also the stop of a command
#: started with SIGINT ignored (a background job).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """:data:`STOP_SIGNALS` raise KeyboardInterrupt inside the block; a caller of ``main([...])`` gets its own
    handlers back after it."""
    previous = {signum: signal.signal(signum, _raise_interrupt) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)
