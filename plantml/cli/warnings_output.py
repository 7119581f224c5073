"""Logged warnings of plantml's packages, printed as ``plantml: warning: ...`` lines on stderr."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

import click


class CurrentStderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line comes (a stream captured or closed since is not kept)."""

    @property
    def stream(self):  # noqa: ANN201 - logging's own attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def shown_warnings(main_rank: bool = True) -> Iterator[None]:
    """While the block runs, print the training and tracking packages' logged warnings as ``plantml: warning: ...``
    lines (on rank 0; the other ranks of a distributed training print only errors), and leave out two of Python's
    warnings that repeat what those say. After it, a caller in the same process (``plantml.cli.main([...])`` from a
    notebook) has its warning filters and those loggers as before."""
    from PIL import Image

    added: list[tuple[logging.Logger, logging.Handler, bool]] = []
    with warnings.catch_warnings():
        # the scan names each very large image once (a plantml warning); Pillow's own repeats it unnamed each epoch
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        # a class named with an emoji or a tab: matplotlib's font draws a box in the figure and says so in two raw
        # lines of Python warning per character; the name itself is intact in the tags, the model's classes and the table
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        for name in ("plantml.training", "plantml.tracking"):
            log = logging.getLogger(name)
            if not log.handlers:  # the caller's own handlers, if any, are left to print them
                handler = CurrentStderr()
                handler.setFormatter(logging.Formatter("plantml: warning: %(message)s"))
                handler.setLevel(logging.WARNING if main_rank else logging.ERROR)
                added.append((log, handler, log.propagate))
                log.addHandler(handler)
                log.propagate = False
        try:
            yield
        finally:
            for log, handler, propagated in added:
                log.removeHandler(handler)
                log.propagate = propagated


def show_warnings(main_rank: bool = True) -> None:
    """:func:`shown_warnings` for as long as the current command runs."""
    click.get_current_context().with_resource(shown_warnings(main_rank))
