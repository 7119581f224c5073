"""Environment variables a command sets for MLflow's client while it runs; its caller's are as before after.

``plantml`` is its own process, but ``plantml.cli.main([...])`` also runs in the caller's
(a notebook, a test suite): a command's quicker HTTP settings or a stack's S3 credentials
must not stay behind in that process and change its later MLflow calls.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from plantml.tracking.environ import restore_environ


@contextlib.contextmanager
def command_environ(defaults: Mapping[str, str], values: Mapping[str, str] | None = None) -> Iterator[None]:
    """``defaults`` where the environment has no value (the user's win), ``values`` in any case; undone on leaving."""
    values = dict(values or {})
    saved = {name: os.environ.get(name) for name in {*defaults, *values}}
    os.environ.update({name: value for name, value in defaults.items() if name not in os.environ})
    os.environ.update(values)
    try:
        yield
    finally:
        restore_environ(saved)
