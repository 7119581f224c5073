"""``plantml registry``: list, promote, roll back, compare and load registered models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from plantml.cli.params import NON_BLANK
from plantml.cli.tables import echo_table, table
from plantml.tracking.environ import command_environ

#: A dead server should fail a registry command in seconds, not after minutes of retries.
#: Values already in the environment win.
QUICK_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def _registry(ctx: click.Context) -> Any:
    from plantml.registry import ModelRegistry
    from plantml.settings import resolve_tracking_settings

    settings = resolve_tracking_settings(tracking_uri=ctx.obj["tracking_uri"])
    # loading a model reads the object store's settings from the environment
    ctx.with_resource(command_environ(QUICK_HTTP_ENV, {k: v for k, v in settings.client_env().items()
                                                       if k != "MLFLOW_TRACKING_URI"}))
    return ModelRegistry(settings.tracking_uri, source=settings.source_of())


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@click.group()
@click.option("--tracking-uri", type=NON_BLANK, default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, .env, sqlite:///mlflow.db).")
@click.pass_context
def registry(ctx: click.Context, tracking_uri: str | None) -> None:
    """List, promote, roll back and compare registered models.

    Aliases replace MLflow's deprecated stages: Production and Staging (any case) mean
    the aliases production and staging.
    """
    ctx.ensure_object(dict)
    ctx.obj["tracking_uri"] = tracking_uri


@registry.command("list")
@click.argument("name", required=False)
@click.pass_context
def list_command(ctx: click.Context, name: str | None) -> None:
    """List every registered model's versions with their stage and aliases, or NAME's versions with runs and metrics."""
    reg = _registry(ctx)
    if name is None:
        models = reg.list_models()
        if not models:
            click.echo("no registered models")
            return
        rows: list[Sequence[Any]] = [("NAME", "VERSION", "STAGE", "ALIASES", "RUN", "CREATED")]
        empty: list[str] = []
        for model in models:
            versions = reg.list_versions(model.name, with_runs=False)  # the table shows no run data
            if not versions:
                empty.append(model.name)
            rows += [(model.name, v.version, v.stage, ",".join(v.aliases) or "-", v.run_id or "-", v.created_at) for v in versions]
        if len(rows) > 1:
            echo_table(rows)
        for name_without_versions in empty:  # after the table, so its columns stay aligned
            click.echo(f"{name_without_versions}: no versions")
        return
    versions = reg.list_versions(name)
    if not versions:
        click.echo(f"{name}: no versions")
        return
    rows = [("VERSION", "STAGE", "ALIASES", "RUN", "STATUS", "CREATED", "METRICS")]
    for v in versions:
        metrics = " ".join(f"{key}={_format_value(value)}" for key, value in v.metrics.items())
        rows.append((v.version, v.stage, ",".join(v.aliases) or "-", v.run_id or "-", v.status, v.created_at, metrics or "-"))
    echo_table(rows)


@registry.command()
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="production", show_default=True, help="Alias to point at VERSION (Production/Staging map to production/staging).")
@click.pass_context
def promote(ctx: click.Context, name: str, version: str, alias: str) -> None:
    """Point an alias of model NAME at VERSION, recording the move on the version."""
    move = _registry(ctx).promote(name, version, alias)
    if move.kind == "unchanged":
        click.echo(f"{name}: alias {move.alias!r} already points at version {move.to_version}")
        return
    was = f"was version {move.from_version}" if move.from_version else "was unset"
    click.echo(f"{name}: alias {move.alias!r} -> version {move.to_version} ({was})")


@registry.command()
@click.argument("name")
@click.option("--alias", default="production", show_default=True, help="Alias to move back.")
@click.pass_context
def rollback(ctx: click.Context, name: str, alias: str) -> None:
    """Point an alias of model NAME back at the version it pointed at before."""
    move = _registry(ctx).rollback(name, alias)
    skipped = f"; passed over deleted version {', '.join(map(str, move.skipped))}" if move.skipped else ""
    click.echo(f"{name}: alias {move.alias!r} rolled back to version {move.to_version} (was version {move.from_version}{skipped})")


@registry.command()
@click.argument("name")
@click.argument("first")
@click.argument("second")
@click.pass_context
def compare(ctx: click.Context, name: str, first: str, second: str) -> None:
    """Compare two versions' (numbers such as 2 or v2, latest, or aliases) params and metrics side by side.

    Rows where the versions differ are marked with *.
    """
    comparison = _registry(ctx).compare(name, first, second)
    header = ("", "KEY", f"v{comparison.first.version}", f"v{comparison.second.version}")
    for title, rows in (("params", comparison.params), ("metrics", comparison.metrics)):
        click.echo(f"{title}:")
        if not rows:
            click.echo("  (none)")
            continue
        compared = [header] + [("*" if r.differs else " ", r.key, _format_value(r.first), _format_value(r.second)) for r in rows]
        for line in table(compared):
            click.echo("  " + line)


@registry.command("load-check")
@click.argument("model")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True, help="Images in the test batch.")
@click.option("--image-size", type=click.IntRange(min=8, max=2048), default=64, show_default=True,
              help="Height and width of the test images.")
@click.option("--no-pickle", is_flag=True,
              help="Rebuild the backbone from the run's checkpoint and load its weights only (plantml train models).")
@click.pass_context
def load_check(ctx: click.Context, model: str, batch_size: int, image_size: int, no_pickle: bool) -> None:
    """Load MODEL (models:/NAME/1, models:/NAME/Production, models:/NAME@production, models:/NAME/latest) and run a random batch."""
    reg = _registry(ctx)  # before importing torch (seconds): a bad tracking URI is reported at once
    import torch

    from plantml.errors import RegistryError

    loaded = reg.load_checkpoint(model) if no_pickle else reg.load_model(model)
    try:
        loaded.eval()
    except NotImplementedError:  # a torch.export graph (MLflow's pt2, older plantml train's format): its mode is the one it was exported in
        pass
    try:
        with torch.no_grad():
            output = loaded(torch.rand(batch_size, 3, image_size, image_size))
    except Exception as exc:  # a shape the model cannot take, a dtype clash: one line, no traceback
        raise RegistryError(f"{model}: loaded, but a {batch_size}x3x{image_size}x{image_size} batch failed: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    click.echo(f"{model}: loaded {type(loaded).__name__}; batch {batch_size}x3x{image_size}x{image_size} -> output {tuple(output.shape)}")


def _subcommand_tracking_uri(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:  # after the command's name too, as train, verify and ui take it
        ctx.ensure_object(dict)["tracking_uri"] = value


for _command in registry.commands.values():
    _command.params.append(click.Option(["--tracking-uri"], type=NON_BLANK, default=None, expose_value=False, is_eager=True,
                                        callback=_subcommand_tracking_uri, help="MLflow tracking URI (as before the command's name)."))
