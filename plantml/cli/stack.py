"""``plantml stack``: run the tracking stack in the foreground."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import FrameType

import click

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
@click.option("--artifacts", "artifact_mode", type=click.Choice(ARTIFACT_MODES), default="direct", show_default=True,
              help="direct: clients write to S3 themselves; proxied: the MLflow server does.")
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the client variables here once every service is ready.")
@click.option("--mlflow-port", type=click.IntRange(1, 65535), help="Port of the MLflow server (default: a free one).")
@click.option("--s3-port", type=click.IntRange(1, 65535), help="Port of the S3 server (default: a free one).")
@click.option("--postgres-port", type=click.IntRange(1, 65535), help="Port of PostgreSQL (default: a free one).")
def up(artifact_mode: str, env_file: Path | None, mlflow_port: int | None, s3_port: int | None, postgres_port: int | None) -> None:
    """Start the stack in the foreground; Ctrl-C (or SIGTERM) stops everything and removes its files."""
    from plantml.stack import LocalStack

    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.perf_counter()
    local = LocalStack(artifact_mode, mlflow_port=mlflow_port, s3_port=s3_port, postgres_port=postgres_port)  # type: ignore[arg-type]
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

    assert isinstance(local, LocalStack)
    click.echo(f"plantml stack ready in {seconds:.1f} s (artifacts: {local.artifact_mode})")
    click.echo(f"  MLflow UI:  {local.tracking_uri}")
    click.echo(f"  S3:         {local.s3_endpoint} (bucket {local.bucket})")
    click.echo(f"  logs:       {local.workdir / 'logs' if local.workdir else '-'}")
    click.echo("Paste into another shell:")
    for key, value in env.items():
        click.echo(f"  export {key}={value}")
    if env_file is not None:
        click.echo(f"(also written to {env_file})")
    click.echo("Press Ctrl-C to stop.", nl=True)


def _wait_while_running(local: object) -> None:
    """Block until interrupted; a service that dies stops the whole stack with an error."""
    from plantml.errors import StackError
    from plantml.stack import LocalStack
    from plantml.stack.local import tail

    assert isinstance(local, LocalStack)
    while True:
        time.sleep(1)
        for name, service in local.services.items():
            if not service.running:
                raise StackError(name, "exited unexpectedly", tail(service.log_path))
