"""``mlflow server`` in one process: MLflow's own command, whose uvicorn server runs in this process instead of
a second Python that imports MLflow again (2 to 3 CPU-seconds, a second or two, and a few hundred MB at every
start of a stack or of ``plantml ui``; ``benchmarks/stack_startup.py``).

``python mlflow_launch.py server ARGS`` takes ``mlflow server``'s arguments and environment. MLflow prepares
everything as it always does (the store's tables, the auth app's admin, the server's settings in the
environment), then asks to run ``python -m uvicorn …``: that command runs here, through uvicorn's own command
line. Anything else it asks to run (gunicorn, waitress), or an MLflow that starts its server some other way,
runs as MLflow always runs it. The job runner, which MLflow would start beside a second process, stays off
(``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, as every plantml server runs).

``--plantml-schema=check`` (a stack's server), before ``server``: a database whose MLflow schema is not this
MLflow's (a kept stack after an MLflow upgrade or downgrade) is refused before MLflow opens it, in one last line,
``plantml-mlflow-schema: {JSON}``, which the stack turns into its advice. MLflow itself would fail on some such
databases and, on others (a new migration that adds a table), migrate them on the spot, with no backup taken.
``--plantml-schema=upgrade`` runs MLflow's migrations on an older schema first (``mlflow db upgrade``).

Standalone on purpose (the standard library, MLflow and uvicorn only): a stack writes this file into its MLflow
service's folder, where the containers backend's image, which has MLflow but not plantml, runs it too.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import mlflow.server
from mlflow.cli import cli

#: The launcher's own option (before ``server``): ``check`` or ``upgrade`` the database's schema first.
SCHEMA_OPTION = "--plantml-schema="
#: The start of the last line written before the launcher exits on a database of another MLflow's schema.
SCHEMA_MARK = "plantml-mlflow-schema: "
#: The exit status then (EX_CONFIG).
SCHEMA_EXIT = 78

#: How MLflow starts its server process (``mlflow.utils.process._exec_cmd``, as ``mlflow.server`` imports it).
_spawn = getattr(mlflow.server, "_exec_cmd", None)


def _serve_here(command: list[str], extra_env: dict[str, str] | None = None, **options: Any) -> Any:
    """Run MLflow's ``python -m uvicorn ARGS`` in this process, with the environment MLflow gives it."""
    if list(command[:3]) != [sys.executable, "-m", "uvicorn"]:
        return _spawn(command, extra_env=extra_env, **options)  # type: ignore[misc]
    import uvicorn.main

    os.environ.update(extra_env or {})
    sys.argv = ["uvicorn", *command[3:]]
    uvicorn.main.main(list(command[3:]), prog_name="uvicorn")  # ends the process with uvicorn's exit status
    return None


def check_schema(uri: str, upgrade: bool) -> None:
    """Exit with :data:`SCHEMA_MARK` unless the database at ``uri`` is empty or has this MLflow's schema; with
    ``upgrade``, an older MLflow's schema is migrated to this one's first."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError
    from mlflow.store.db import utils

    engine = utils.create_sqlalchemy_engine_with_retry(uri)  # waits for a database server still starting, as MLflow does
    try:
        found, expected = utils._get_schema_version(engine), utils._get_latest_schema_revision()
        if found is None or found == expected or utils._is_empty_database(engine):
            return  # a new database (MLflow creates its tables) or this MLflow's
        try:
            ScriptDirectory.from_config(utils._get_alembic_config(uri)).get_revision(found)
            newer = False
        except CommandError:  # a revision this MLflow does not know: a later MLflow wrote it
            newer = True
        if upgrade and not newer:
            print(f"plantml: upgrading the database's MLflow schema from {found} to {expected}", file=sys.stderr, flush=True)
            utils._upgrade_db(engine)
            return
    finally:
        engine.dispose()
    facts = {"found": found, "expected": expected, "mlflow": mlflow.__version__, "newer": newer}
    print(SCHEMA_MARK + json.dumps(facts), file=sys.stderr, flush=True)
    sys.exit(SCHEMA_EXIT)


def _checking_schema_first(upgrade: bool) -> None:
    """Have ``mlflow server`` check its backend store's schema (:func:`check_schema`) before it opens it."""
    import mlflow.server.handlers as handlers

    initialize = handlers.initialize_backend_stores

    def initialize_after_check(backend_store_uri: str | None = None, *args: Any, **kwargs: Any) -> Any:
        if backend_store_uri:
            check_schema(backend_store_uri, upgrade)
        return initialize(backend_store_uri, *args, **kwargs)

    handlers.initialize_backend_stores = initialize_after_check  # type: ignore[assignment]


def main() -> None:
    args = sys.argv[1:]
    if args and args[0].startswith(SCHEMA_OPTION):
        _checking_schema_first(upgrade=args.pop(0)[len(SCHEMA_OPTION):] == "upgrade")
    if _spawn is not None:
        mlflow.server._exec_cmd = _serve_here  # type: ignore[attr-defined]
    cli(args, prog_name="mlflow")


if __name__ == "__main__":
    main()
