"""Process-wide MLflow settings applied for the duration of one call, under one lock.

MLflow reads some settings from process-wide state at call time: the S3 artifact
repository reads MLFLOW_S3_ENDPOINT_URL and AWS_* from os.environ, and
``mlflow.pytorch.log_model`` uses the global tracking URI. A tracker (or its sender
thread) applies its own values only for the duration of such a call, under this lock,
then restores the old ones; that is what keeps two trackers on two servers from writing
to each other's.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping

GLOBAL_STATE_LOCK = threading.RLock()


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` under the module lock; restore the previous ones after."""
    with GLOBAL_STATE_LOCK:
        saved = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for name, old in saved.items():
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
