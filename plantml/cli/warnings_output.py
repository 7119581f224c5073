"""Logged warnings of plantml's packages, printed as ``plantml: warning: ...`` lines on stderr."""

from __future__ import annotations

import logging
import sys
import warnings


class CurrentStderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line comes (a stream captured or closed since is not kept)."""

    @property
    def stream(self):  # noqa: ANN201 - logging's own attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_warnings(main_rank: bool = True) -> None:
    """Print the training and tracking packages' logged warnings as ``plantml: warning: ...`` lines
    (on rank 0; the other ranks of a distributed training print only errors)."""
    from PIL import Image

    # the scan names each very large image once (a plantml warning); Pillow's own repeats it unnamed each epoch
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # a class named with an emoji or a tab: matplotlib's font draws a box in the figure and says so in two raw lines
    # of Python warning per character; the name itself is intact in the tags, the model's classes and the table
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
    for name in ("plantml.training", "plantml.tracking"):
        log = logging.getLogger(name)
        if not log.handlers:
            handler = CurrentStderr()
            handler.setFormatter(logging.Formatter("plantml: warning: %(message)s"))
            handler.setLevel(logging.WARNING if main_rank else logging.ERROR)
            log.addHandler(handler)
            log.propagate = False
