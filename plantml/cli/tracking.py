"""``plantml tracking``: deliver what runs could not (``recover``, ``replay JOURNAL``)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from plantml.cli.params import NON_BLANK
from plantml.text import mask_passwords
from plantml.tracking.environ import command_environ

#: A dead server should fail MLflow client calls in seconds: recovery does its own retrying.
QUICK_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
STATUSES = click.Choice(["KILLED", "FAILED", "FINISHED"])


class _Seconds(click.FloatRange):
    """A duration in seconds: 0 or more, and finite (``nan`` compares False with any bound, so FloatRange lets it in)."""

    def __init__(self) -> None:
        super().__init__(min=0)

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds.", param, ctx)
        return seconds


SECONDS = _Seconds()


@click.group()
def tracking() -> None:
    """Deliver what runs left in their journals; end runs whose process died."""
    click.get_current_context().with_resource(command_environ(QUICK_HTTP_ENV))


def _show(report) -> None:
    click.echo(mask_passwords(report.message))
    for line in report.skipped_lines:
        click.echo(f"  {report.journal}: {line}: skipped", err=True)
    for refused in report.refused:
        click.echo(f"  {report.journal}: refused by the server, set aside: {refused}", err=True)


def _server_of(path: Path) -> str | None:
    """The tracking URI ``path`` names; None when its header cannot be read (its recovery says why)."""
    from plantml.errors import UsageError
    from plantml.tracking.journal_io import read_header

    try:
        return read_header(path).tracking_uri
    except UsageError:
        return None


@tracking.command()
@click.argument("journal", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tracking-uri", type=NON_BLANK, default=None, help="Deliver to this server instead of the one the journal names.")
@click.option("--timeout", type=SECONDS, default=300.0, show_default=True,
              help="Seconds to keep retrying while the server or the object store is away.")
@click.option("--status", type=STATUSES, default="KILLED", show_default=True,
              help="End status of a run whose journal asked for none (its process died).")
def replay(journal: Path, tracking_uri: str | None, timeout: float, status: str) -> int:
    """Deliver JOURNAL exactly once, then end its run (recovery of one file).

    Values the server already has are not sent twice. The journal is removed once
    everything is delivered; it is kept, and the exit code is 1, when the server refused
    entries, lines were corrupt (reported by number, the rest delivered), the run is
    deleted or already ended, or the server stayed away. S3 credentials come from the
    environment or .env, never from the journal.
    """
    from plantml.settings import resolve_tracking_settings
    from plantml.tracking.recover import recover_journal

    settings = resolve_tracking_settings(tracking_uri) if tracking_uri else None
    report = recover_journal(journal, settings, timeout=timeout, status=status, why="replayed", idle=True)
    _show(report)
    if report.model_versions:
        click.echo(f"registered version(s) {', '.join(map(str, report.model_versions))}")
    return 0 if report.ok else 1


@tracking.command()
@click.option("--dry-run", is_flag=True, help="List what would be done, change nothing.")
@click.option("--stale", metavar="DURATION", default=None,
              help="Also end RUNNING runs whose heartbeat is older than DURATION (e.g. 10m, 2h; at least 3m): processes that died "
                   "on another machine. Runs whose journal a live process here writes are left alone.")
@click.option("--status", type=STATUSES, default="KILLED", show_default=True,
              help="End status of the runs recovered (a journal that asked for a status keeps it).")
@click.option("--journal-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of journals [default: $PLANTML_JOURNAL_DIR, else journal/ in $PLANTML_CACHE_DIR or ~/.cache/plantml].")
@click.option("--tracking-uri", type=NON_BLANK, default=None, help="Server searched by --stale [default: $MLFLOW_TRACKING_URI, .env].")
@click.option("--experiment-name", type=NON_BLANK, multiple=True, help="Experiment searched by --stale (repeatable) [default: all].")
@click.option("--timeout", type=SECONDS, default=300.0, show_default=True, help="Seconds to keep retrying for each journal (without progress: a long one delivered steadily goes on).")
def recover(dry_run: bool, stale: str | None, status: str, journal_dir: Path | None, tracking_uri: str | None,
            experiment_name: tuple[str, ...], timeout: float) -> int:
    """Deliver the journals of processes gone from this machine and end their runs (KILLED by default).

    Each run is tagged plantml.recovered. A journal whose process still runs, or that
    another recovery holds, is left alone. Exit code 1 when a journal had to be kept.
    """
    from plantml.errors import TrackingError, UsageError
    from plantml.settings import resolve_tracking_settings
    from plantml.tracking.journal import JournalBusy
    from plantml.tracking.journal_io import journal_dir as default_journal_dir
    from plantml.tracking.recover import describe_orphan, end_stale_runs, parse_stale, recover_journal, recover_orphans
    from plantml.tracking.sender import resolve_delivery_settings

    older_than = parse_stale(stale) if stale else None
    delivery = resolve_delivery_settings(journal_folder=journal_dir)
    folder = default_journal_dir(journal_dir)
    orphans = recover_orphans(folder)
    failures = 0
    unreachable: set[str] = set()  # servers that did not answer: each costs its wait once, not once per journal
    for path in orphans:
        if dry_run:
            click.echo(mask_passwords(describe_orphan(path)))
            continue
        server = _server_of(path)
        if server in unreachable:
            click.echo(mask_passwords(f"journal {path}: {server} not reachable (above); journal kept"))
            failures += 1
            continue
        try:
            report = recover_journal(path, None, delivery, timeout=timeout, status=status, move_kept=True, idle=True)
        except JournalBusy:  # a second `recover`, or a tracker starting, took it after the scan
            click.echo(f"journal {path}: being recovered by another process; left to it")
            continue
        except UsageError:
            if path.exists():
                raise
            click.echo(f"journal {path}: recovered by another process meanwhile")  # removed or kept aside since the scan
            continue
        except TrackingError as exc:
            click.echo(str(exc), err=True)
            failures += 1
            continue
        _show(report)
        failures += not report.ok
        if report.unreachable and server is not None:
            unreachable.add(server)
    if not orphans:
        click.echo(f"no journals of dead processes in {folder}")
    if older_than is not None:
        settings = resolve_tracking_settings(tracking_uri)
        runs = end_stale_runs(settings, older_than, experiment_name, dry_run=dry_run, status=status,
                              journal_folder=folder)
        for run in runs:
            verb = "would end" if dry_run else "ended"
            click.echo(f"{verb} run {run.run_id} {status}: heartbeat {run.heartbeat} ({run.age_s / 60:.0f} min old)")
        if not runs:
            click.echo(f"no RUNNING run with a heartbeat older than {stale} on {mask_passwords(settings.tracking_uri)}")
    return 1 if failures else 0
