"""One MLflow call of the registry, its failure named in one line.

"Not found" and a malformed name are the caller's (:class:`~plantml.errors.RegistryError`); a
server that does not answer is named with the URI and where it came from, in seconds where
MLflow's client would retry for minutes; boto3's failures are the object store's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from plantml.errors import RegistryError, TrackingError, connection_reason, foreign_answer, one_line
from plantml.registry.store import (
    no_server_answered,
    object_store_error,
    object_store_errors,
    object_store_foreign,
    server_unreachable,
)
from plantml.text import mask_passwords
from plantml.tracking.environ import forget_stale_s3_clients

T = TypeVar("T")


class RegistryCalls:
    """The calls of one registry's ``client``; ``source`` says where ``tracking_uri`` came from."""

    def __init__(self, client: Any, tracking_uri: str, source: str) -> None:
        self.client = client
        self.tracking_uri = tracking_uri
        self.source = source

    def run(self, run_id: str) -> Any | None:
        """The run, or None when it was deleted (a version outlives its run)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise TrackingError(f"run {run_id}: {one_line(exc)}") from exc

    def paged(self, fetch: Callable[[str | None], Any], what: str) -> Iterator[Any]:
        """Every item of a paged search, ``fetch(page_token)`` called once a page through :meth:`call`."""
        token: str | None = None
        while True:
            page = self.call(lambda: fetch(token), what)  # noqa: B023 - called at once
            yield from page
            token = getattr(page, "token", None)
            if not token:
                return

    def unreachable(self, what: str) -> TrackingError:
        """The one line for a tracking server that does not answer, naming where its URI came from."""
        return TrackingError(f"{what}: {mask_passwords(self.tracking_uri)}: tracking server not reachable; "
                             f"this URI came from {self.source}")

    def call(self, action: Callable[[], T], what: str) -> T:
        """Run one MLflow call; "not found" becomes a :class:`RegistryError` naming ``what``."""
        from mlflow.exceptions import MlflowException

        forget_stale_s3_clients()  # the S3 settings may have changed since the last call (another stack's keys)
        if server_unreachable(self.tracking_uri):  # seconds, where MLflow's client would retry for minutes
            raise self.unreachable(what)
        try:
            return action()
        except MlflowException as exc:
            foreign = foreign_answer(exc)  # before "not found": another program's 404 page says "Not Found"
            if foreign is not None:
                raise TrackingError(f"{what}: {mask_passwords(self.tracking_uri)}: {foreign}") from exc
            foreign = object_store_foreign(exc)  # the same page from the object store, wrapped by MLflow
            if foreign is not None:
                raise TrackingError(f"{what}: {foreign}") from exc
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
                raise RegistryError(f"{what}: not found") from exc
            if exc.error_code == "INVALID_PARAMETER_VALUE":  # the caller's name or version is malformed
                raise RegistryError(f"{what}: {one_line(exc).removeprefix('INVALID_PARAMETER_VALUE: ')}") from exc
            if no_server_answered(exc):  # a stale .env (a stack stopped since) is the usual cause: say where the URI came from
                raise self.unreachable(what) from exc
            raise TrackingError(f"{what}: {one_line(exc)}") from exc
        except object_store_errors() as exc:  # boto3's, before OSError: its timeouts are OSErrors too
            raise object_store_error(exc, what) from exc
        except OSError as exc:  # connection refused, DNS, timeouts (requests' errors are OSErrors)
            if exc.filename is not None:  # a file's (a local store's): not the server's
                raise TrackingError(f"{what}: {one_line(exc)}") from exc
            raise TrackingError(f"{what}: tracking server {mask_passwords(self.tracking_uri)} unreachable ({connection_reason(exc)})") from exc
