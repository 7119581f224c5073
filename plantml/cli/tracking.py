"""``plantml tracking``: tracking utilities (``replay JOURNAL``)."""

from __future__ import annotations

import os
from pathlib import Path

import click

#: A dead server should fail MLflow client calls in seconds: replay does its own retrying.
QUICK_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@click.group()
def tracking() -> None:
    """Tracking utilities: deliver what a run could not send in time."""


@tracking.command()
@click.argument("journal", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tracking-uri", default=None, help="Deliver to this server instead of the one the journal names.")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds to keep retrying while the server or the object store is away.")
def replay(journal: Path, tracking_uri: str | None, timeout: float) -> None:
    """Deliver JOURNAL (left by a run whose end could not wait), then end the run with its true status.

    Values the server already has are not sent twice. The journal is removed once
    everything is delivered; on failure it keeps what is left, and replay can run again.
    S3 credentials come from the environment or .env, never from the journal.
    """
    from plantml.tracking.replay import replay as replay_journal

    for key, value in QUICK_HTTP_ENV.items():
        os.environ.setdefault(key, value)
    result = replay_journal(journal, tracking_uri=tracking_uri, timeout=timeout)
    versions = f", registered version(s) {', '.join(map(str, result.model_versions))}" if result.model_versions else ""
    click.echo(
        f"run {result.run_id}: delivered {result.delivered} entries "
        f"({result.already_stored} already stored, {result.rejected} refused){versions}; ended {result.status}"
    )
