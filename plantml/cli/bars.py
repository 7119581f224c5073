"""The command line's progress bars: on stderr, only on a terminal, gone once done (a log or a pipe gets nothing)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def bytes_bar(description: str) -> Any:
    """A progress bar in bytes on stderr (hidden when stderr is not a terminal); the transfer sets its total."""
    from tqdm import tqdm

    return tqdm(unit="B", unit_scale=True, desc=description, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


def iteration_bar(iterable: Iterable, *, total: int, desc: str, unit: str, stream_is_tty: bool | None = None) -> Iterable:
    """``iterable`` under a progress bar on a terminal, wiped once done; ``iterable`` itself elsewhere.
    ``stream_is_tty``: whether stderr is a terminal (asked when None)."""
    if not (sys.stderr.isatty() if stream_is_tty is None else stream_is_tty):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)


def scan_bar(iterable: Iterable, *, total: int, stream_is_tty: bool | None = None) -> Iterable:
    """A data folder's images, as its scan reads them, under :func:`iteration_bar`: a first scan of 50,000 photos
    takes half a minute."""
    return iteration_bar(iterable, total=total, desc="scan", unit="image", stream_is_tty=stream_is_tty)
