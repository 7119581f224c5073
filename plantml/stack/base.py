"""The stack object every backend returns: endpoints plus lifecycle and fault controls."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plantml.errors import StackError
from plantml.settings import DEFAULT_EXPERIMENT_NAME, TrackingSettings
from plantml.stack.endpoints import ArtifactMode, StackEndpoints

if TYPE_CHECKING:
    from types import TracebackType


class Stack:
    """A tracking stack: PostgreSQL, an S3 object store and an MLflow server.

    Use it as a context manager (``with start_local_stack() as stack:``) or call
    :meth:`start` and :meth:`stop`. Once started, :attr:`endpoints` and the
    shortcuts below describe where everything is.
    """

    backend = "abstract"

    def __init__(self) -> None:
        self._endpoints: StackEndpoints | None = None

    # -- lifecycle (backends override) ------------------------------------------
    def start(self, service: str | None = None) -> Stack:
        """Start every service (or only ``service``) and wait until it answers."""
        raise NotImplementedError

    def stop(self, service: str | None = None) -> None:
        """Stop every service and remove what it wrote (or stop only ``service``)."""
        raise NotImplementedError

    def restart(self, service: str) -> None:
        """Stop then start one service, keeping its data, ports and credentials."""
        self.stop(service)
        self.start(service)

    def service_logs(self) -> dict[str, str]:
        """Each service's whole log so far, by service name (empty for a stack plantml did not start)."""
        return {}

    def __enter__(self) -> Stack:
        return self if self._endpoints is not None else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- what users read ----------------------------------------------------------
    @property
    def endpoints(self) -> StackEndpoints:
        """Endpoints and credentials; available once the stack has started."""
        if self._endpoints is None:
            raise StackError("stack", "not started")
        return self._endpoints

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking server's URL."""
        return self.endpoints.tracking_uri

    @property
    def s3_endpoint(self) -> str | None:
        """The S3 object store's URL."""
        return self.endpoints.s3_endpoint

    @property
    def aws_access_key(self) -> str | None:
        """The S3 access key id."""
        return self.endpoints.aws_access_key

    @property
    def aws_secret_key(self) -> str | None:
        """The S3 secret key (never shown in a repr)."""
        return self.endpoints.aws_secret_key

    @property
    def bucket(self) -> str:
        """The artifact bucket."""
        return self.endpoints.bucket

    @property
    def buckets(self) -> tuple[str, ...]:
        """Every bucket the stack created (the artifact bucket first)."""
        return self.endpoints.buckets

    @property
    def artifact_mode(self) -> ArtifactMode:
        """``direct`` (clients write to S3) or ``proxied`` (the server does)."""
        return self.endpoints.artifact_mode

    def client_env(self) -> dict[str, str]:
        """The variables a client shell needs (see :meth:`StackEndpoints.client_env`)."""
        return self.endpoints.client_env()

    def s3_client(self, **config: Any) -> Any:
        """A boto3 client for the object store."""
        return self.endpoints.s3_client(**config)

    def tracking_settings(self, experiment_name: str = DEFAULT_EXPERIMENT_NAME) -> TrackingSettings:
        """Tracker settings pointing at this stack."""
        return self.endpoints.tracking_settings(experiment_name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend} {self._endpoints!r}>"
