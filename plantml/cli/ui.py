"""``plantml ui``: MLflow's UI on the runs plantml wrote, opened on the newest run."""

from __future__ import annotations

import signal
import time

import click

from plantml.cli.foreground import STOP_SIGNALS, stopped_by_signals
from plantml.cli.params import NON_BLANK
from plantml.text import mask_passwords

#: A dead server should fail this command in seconds (values already in the environment win).
QUICK_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


#: Seconds ``plantml ui`` waits for a tracking server to answer before it says where its URI came from.
SERVER_WAIT_S = 3.0


@click.command("ui")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port on 127.0.0.1 [default: 5000, or a free one when 5000 is taken].")
@click.option("--tracking-uri", type=NON_BLANK, default=None,
              help="Store or server to show [default: $MLFLOW_TRACKING_URI, .env, or sqlite:///mlflow.db].")
def ui(port: int | None, tracking_uri: str | None) -> None:
    """Show MLflow's UI (model-training view) for the store plantml uses, and print the newest run's URL.

    A local store (the default sqlite:///mlflow.db, with its ./mlruns artifacts) is served
    on 127.0.0.1 until Ctrl-C; for a tracking server the link is printed and nothing is started.
    """
    from plantml.settings import resolve_tracking_settings
    from plantml.tracking.environ import command_environ
    from plantml.ui import LocalUI, is_server_uri, newest_run

    click.get_current_context().with_resource(command_environ(QUICK_HTTP_ENV))
    settings = resolve_tracking_settings(tracking_uri=tracking_uri)
    uri = settings.tracking_uri
    if is_server_uri(uri):
        from plantml.tracking.connection import wait_for_server

        # a stale .env (a stack stopped since) is the usual cause: say so, and where the URI came from
        wait_for_server(uri, SERVER_WAIT_S, settings.source_of("tracking_uri"))
        landing = newest_run(uri)
        click.echo(landing.url(uri) if landing else uri)
        return
    server = LocalUI(uri, port, source=settings.source_of("tracking_uri"))  # refuses a store that does not exist
    landing = newest_run(uri)
    with stopped_by_signals():
        try:
            server.start()
            click.echo(mask_passwords(f"MLflow UI for {uri}: {landing.url(server.base_url) if landing else server.base_url}"))
            click.echo("Press Ctrl-C to stop.")
            while server.running:
                time.sleep(0.5)
            raise click.ClickException(f"the mlflow server for {mask_passwords(uri)} stopped by itself")
        except KeyboardInterrupt:
            click.echo("plantml ui: stopped", err=True)
        finally:
            for signum in STOP_SIGNALS:  # a second Ctrl-C (or SIGHUP) must not orphan the server
                signal.signal(signum, signal.SIG_IGN)
            server.stop()
