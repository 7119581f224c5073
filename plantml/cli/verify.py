"""``plantml verify``: the eight checks of a tracking installation, one line each."""

from __future__ import annotations

import click

from plantml.cli.params import NON_BLANK
from plantml.tracking.environ import command_environ

#: Set while the command runs (values already in the environment win).
QUICK_HTTP_ENV = {
    # MLflow's HTTP client retries a dead server for minutes by default; verify must answer fast.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # MLflow writes "View run ... at: URL" to stdout when a run ends; the report is ours.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # The artifact read-back would otherwise draw a progress bar between the ✓ lines.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


@click.command()
@click.option("--tracking-uri", type=NON_BLANK, default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, .env, sqlite:///mlflow.db).")
@click.option("--experiment-name", type=NON_BLANK, default=None,
              help="Experiment the verification run goes to (default: $PLANTML_VERIFY_EXPERIMENT or plantml_verification; "
                   "never the training experiment).")
def verify(tracking_uri: str | None, experiment_name: str | None) -> None:
    """Check a tracking installation: connection, experiment, run, params, metrics, artifact, tags, run info.

    Prints one ✓ line per check, then ✓ ALL MLFLOW TESTS PASSED (exit 0); on the first
    failure prints ✗ CHECK: CAUSE and exits 1. The run it makes goes to the
    plantml_verification experiment, is tagged plantml.verification=true and always ended.
    """
    from plantml.settings import env_value, resolve_tracking_settings
    from plantml.tracking import signals
    from plantml.verification import ALL_PASSED, run_checks

    # Its own experiment: verification runs must not mix with training runs.
    settings = resolve_tracking_settings(tracking_uri=tracking_uri,
                                         experiment_name=env_value("PLANTML_VERIFY_EXPERIMENT", experiment_name))
    click.get_current_context().with_resource(command_environ(QUICK_HTTP_ENV))
    failed = None
    # The runner stops by itself after a failure; letting it finish (rather than
    # breaking out) runs its clean-up, which ends the verification run. SIGTERM and
    # SIGHUP unwind it as Ctrl-C does, so they too leave the run ended, not RUNNING.
    with signals.handled():
        for result in run_checks(settings):
            click.echo(result.line)
            if not result.ok:
                failed = result
    if failed is not None:
        click.get_current_context().exit(1)  # the ✗ line already said what failed
    click.echo(ALL_PASSED)
