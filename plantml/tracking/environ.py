"""Process-wide MLflow settings applied for the duration of one call, under one lock.

MLflow reads some settings from process-wide state at call time: the S3 artifact
repository reads MLFLOW_S3_ENDPOINT_URL and AWS_* from os.environ, and the model registry
of a database store (sqlite, PostgreSQL) finds the logged model a new version points at
through the global tracking URI, whatever the client's own. A tracker (or its sender
thread) applies its own values only for the duration of such a call, under this lock,
then restores the old ones; that is what keeps two trackers on two servers from writing
to each other's. A command run from Python (``plantml.cli.main([...])``) sets its own for as
long as it runs (:func:`command_environ`), and its caller's are as before after.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Iterator, Mapping

GLOBAL_STATE_LOCK = threading.RLock()

#: The variables MLflow's S3 client is built from.
S3_VARIABLES = frozenset({"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
_last_s3_settings: dict[str, str | None] = {}


def forget_stale_s3_clients() -> None:
    """Drop MLflow's cached S3 clients when the S3 settings in force have changed.

    MLflow caches its boto3 clients by endpoint URL only, and boto3's default session
    caches the credentials it first read from the environment, for the whole process. A
    second stack (or a tracker with other keys) would otherwise be sent the first one's
    keys: ``InvalidAccessKeyId``.
    """
    current = {name: os.environ.get(name) for name in S3_VARIABLES}
    if current == _last_s3_settings:
        return
    _last_s3_settings.clear()
    _last_s3_settings.update(current)
    repo = sys.modules.get("mlflow.store.artifact.s3_artifact_repo")
    if repo is not None:
        repo._cached_get_s3_client.cache_clear()
    boto3 = sys.modules.get("boto3")
    if boto3 is not None:
        boto3.DEFAULT_SESSION = None  # the next client resolves the credentials afresh


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str], wait: float | None = None) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` under the module lock; restore the previous ones after.

    ``wait``: at most that many seconds for the lock (another thread's call may hold it for
    as long as an upload to a hung object store takes), then :class:`TimeoutError`.
    """
    if not GLOBAL_STATE_LOCK.acquire(timeout=-1 if wait is None else wait):
        raise TimeoutError(f"another MLflow call of this process held its settings for {wait:.0f} s")
    try:
        saved = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        if S3_VARIABLES & set(values):
            forget_stale_s3_clients()
        try:
            yield
        finally:
            restore_environ(saved)
    finally:
        GLOBAL_STATE_LOCK.release()


def restore_environ(saved: Mapping[str, str | None]) -> None:
    """Put back the values ``saved`` (None: the variable was not set)."""
    for name, old in saved.items():
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def scoped_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` under the module lock, the host's put back after.

    Set in MLflow's module variable itself: ``mlflow.set_tracking_uri`` would also write
    MLFLOW_TRACKING_URI into the environment and unset it when put back to None, taking a
    variable the host had set with it.
    """
    from mlflow.tracking._tracking_service import utils

    with GLOBAL_STATE_LOCK:
        saved = utils._tracking_uri
        utils._tracking_uri = uri
        try:
            yield
        finally:
            utils._tracking_uri = saved


class ScopedClient:
    """An ``MlflowClient`` whose every call runs with ``env`` in force (:func:`scoped_environ`).

    What :attr:`MLflowTracker.client <plantml.tracking.MLflowTracker.client>` hands out: its
    artifact calls reach the tracker's object store with the tracker's keys, not whatever
    the process's environment holds (nothing there: boto3's default, public AWS).
    """

    def __init__(self, client: object, env: Mapping[str, str]) -> None:
        self._client, self._env = client, dict(env)

    def __getattr__(self, name: str) -> object:
        attribute = getattr(self._client, name)
        if not callable(attribute) or not self._env:
            return attribute

        @functools.wraps(attribute)
        def scoped(*args: object, **kwargs: object) -> object:
            with scoped_environ(self._env):
                return attribute(*args, **kwargs)

        return scoped

    def __repr__(self) -> str:
        return f"ScopedClient({self._client!r})"


@contextlib.contextmanager
def command_environ(defaults: Mapping[str, str], values: Mapping[str, str] | None = None) -> Iterator[None]:
    """``defaults`` where the environment has no value (the user's win), ``values`` in any case; undone on leaving.

    ``plantml`` is its own process, but ``main([...])`` also runs in its caller's (a notebook, a test
    suite): a command's quicker HTTP settings or a stack's S3 keys must not stay behind there.
    """
    values = dict(values or {})
    saved = {name: os.environ.get(name) for name in {*defaults, *values}}
    os.environ.update({name: value for name, value in defaults.items() if name not in os.environ})
    os.environ.update(values)
    try:
        yield
    finally:
        restore_environ(saved)
