"""``mlflow server`` in one process: MLflow's own command, whose uvicorn server runs in this process instead of
a second Python that imports MLflow again (2 to 3 CPU-seconds, a second or two, and a few hundred MB at every
start of a stack or of ``plantml ui``; ``benchmarks/stack_startup.py``).

``python mlflow_launch.py server ARGS`` takes ``mlflow server``'s arguments and environment. MLflow prepares
everything as it always does (the store's tables, the auth app's admin, the server's settings in the
environment), then asks to run ``python -m uvicorn …``: that command runs here, through uvicorn's own command
line. Anything else it asks to run (gunicorn, waitress), or an MLflow that starts its server some other way,
runs as MLflow always runs it. The job runner, which MLflow would start beside a second process, stays off
(``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, as every plantml server runs).

Standalone on purpose (the standard library, MLflow and uvicorn only): a stack writes this file into its MLflow
service's folder, where the containers backend's image, which has MLflow but not plantml, runs it too.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import mlflow.server
from mlflow.cli import cli

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


def main() -> None:
    if _spawn is not None:
        mlflow.server._exec_cmd = _serve_here  # type: ignore[attr-defined]
    cli(sys.argv[1:], prog_name="mlflow")


if __name__ == "__main__":
    main()
