"""The tracking stack: PostgreSQL (metadata), an S3 object store (artifacts), the MLflow server.

``start_local_stack()`` runs it as local processes, ``ContainersStack`` as Docker
containers; ``ExternalStack`` describes one started elsewhere. All give the same
:class:`Stack` object.
"""

from plantml.stack.base import Stack
from plantml.stack.endpoints import ARTIFACT_MODES, ArtifactMode, StackEndpoints
from plantml.stack.external import ExternalStack
from plantml.stack.local import LocalStack, start_local_stack
from plantml.stack.services import SERVICE_NAMES, MLflowServerSpec, PostgresSpec, S3Spec, StackSpec

BACKENDS = ("local", "containers", "external")


def make_stack(backend: str = "local", artifact_mode: ArtifactMode = "direct", **kwargs: object) -> Stack:
    """An unstarted stack of the named backend (``local``, ``containers`` or ``external``).

    ``artifact_mode`` is ignored by ``external`` (the stack has the mode it was started with).
    """
    from plantml.errors import ConfigError

    if backend == "local":
        return LocalStack(artifact_mode, **kwargs)  # type: ignore[arg-type]
    if backend == "containers":
        from plantml.stack.containers import ContainersStack  # docker and testcontainers load only when used

        return ContainersStack(artifact_mode, **kwargs)  # type: ignore[arg-type]
    if backend == "external":
        return ExternalStack(**kwargs)  # type: ignore[arg-type]
    raise ConfigError(f"stack backend {backend!r}: expected one of {', '.join(BACKENDS)}")


__all__ = [
    "ARTIFACT_MODES", "BACKENDS", "SERVICE_NAMES", "ArtifactMode", "ExternalStack", "LocalStack", "MLflowServerSpec",
    "PostgresSpec", "S3Spec", "Stack", "StackEndpoints", "StackSpec", "make_stack", "start_local_stack",
]
