"""The tracking stack: PostgreSQL (metadata), an S3 object store (artifacts), the MLflow server.

Each service is described once (:mod:`~plantml.stack.postgres`, :mod:`~plantml.stack.s3`,
:mod:`~plantml.stack.mlflow_server`, the contract in :mod:`~plantml.stack.service`);
:class:`~plantml.stack.stack.ManagedStack` starts, supervises, stops and persists them
through a runner: ``start_local_stack()`` / :class:`LocalStack` as local processes,
``ContainersStack`` as Docker containers. ``ExternalStack`` describes a stack started
elsewhere. All give the same :class:`Stack` object.
"""

from plantml.stack.base import Stack
from plantml.stack.endpoints import ARTIFACT_MODES, ArtifactMode, StackEndpoints
from plantml.stack.external import ExternalStack
from plantml.stack.host import LocalStack, start_local_stack
from plantml.stack.mlflow_server import MLflowServerSpec
from plantml.stack.postgres import PostgresSpec
from plantml.stack.s3 import S3Spec
from plantml.stack.service import SERVICE_NAMES
from plantml.stack.stack import ManagedStack, StackSpec

BACKENDS = ("local", "containers", "external")


def make_stack(backend: str = "local", artifact_mode: ArtifactMode = "direct", **options: object) -> Stack:
    """An unstarted stack of the named backend (``local``, ``containers`` or ``external``).

    ``options`` are those of :class:`ManagedStack` (``data_dir``, ``durable``, ``auth``, ports…);
    ``containers`` also takes ``images`` (see ``ContainerSettings.from_env``). ``external``
    takes ``env_file`` and ``bucket``, and ignores ``artifact_mode`` (the stack has the mode
    it was started with).
    """
    from plantml.errors import ConfigError

    if backend == "local":
        return LocalStack(artifact_mode, **options)  # type: ignore[arg-type]
    if backend == "containers":
        from plantml.stack.containers import ContainersStack  # docker and testcontainers load only when used

        return ContainersStack(artifact_mode, **options)  # type: ignore[arg-type]
    if backend == "external":
        return ExternalStack(**options)  # type: ignore[arg-type]
    raise ConfigError(f"stack backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def prune(everything: bool = False) -> list[str]:
    """Clean up what stacks whose owner died left behind: containers (when Docker answers), processes, folders.

    ``everything`` also removes the containers of live stacks. Returns what was removed, in words.
    """
    from plantml.errors import StackError
    from plantml.stack.leftovers import prune_local_stacks

    removed = []
    try:
        from plantml.stack.docker_api import prune_containers

        removed += [f"container {name}" for name in prune_containers(everything)]
    except StackError:
        pass  # no Docker here: no containers to prune
    return removed + prune_local_stacks()


__all__ = [
    "ARTIFACT_MODES", "BACKENDS", "SERVICE_NAMES", "ArtifactMode", "ExternalStack", "LocalStack", "MLflowServerSpec",
    "ManagedStack", "PostgresSpec", "S3Spec", "Stack", "StackEndpoints", "StackSpec", "make_stack", "prune",
    "start_local_stack",
]
