"""A kept stack after an upgrade: its MLflow server on a database of another MLflow's schema is refused before
MLflow opens it, its PostgreSQL on a cluster of another major version says so, each in one line that says what to do
(the whole path on a real stack is in ``tests/integration/test_stack_kept.py``)."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from plantml.stack.mlflow_server import LAUNCHER_PATH, SCHEMA_MARK, SCHEMA_OPTION, schema_refusal
from plantml.stack.postgres import version_refusal
from plantml.stack.service import ServiceSpec


def older_store(folder: Path) -> tuple[str, str, str]:
    """A sqlite store whose schema MLflow's last migration took back (its tables dropped, as MLflow's own
    ``downgrade`` does): the store of the MLflow before this one. Its URI, its revision and this MLflow's."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config, _get_latest_schema_revision, _initialize_tables

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    engine = sqlalchemy.create_engine(uri)
    _initialize_tables(engine)
    config = _get_alembic_config(uri)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "-1")
    engine.dispose()
    return uri, revision_of(folder / "mlflow.db"), _get_latest_schema_revision()


def revision_of(database: Path) -> str:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def launch(uri: str, schema: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """The launcher as a stack runs it (its schema option, then ``mlflow server``), on ``uri``."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    return subprocess.run([sys.executable, str(LAUNCHER_PATH), f"{SCHEMA_OPTION}{schema}", "server", "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "1"], capture_output=True, text=True, timeout=120, cwd=folder,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(folder), "MLFLOW_BACKEND_STORE_URI": uri,
                               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def test_the_launcher_refuses_an_older_schema_that_mlflow_would_have_migrated_unasked(tmp_path: Path) -> None:
    """MLflow alone opens this store by migrating it on the spot, no backup taken (the last migration added tables:
    MLflow reads a missing table as a new database), and on other upgrades refuses it with advice naming a URI the
    stack's user does not have. The launcher refuses both before MLflow opens the store, and leaves it as it was."""
    uri, older, head = older_store(tmp_path)

    done = launch(uri, "check", tmp_path)

    assert done.returncode == 78, done.stderr[-2000:]
    said = schema_refusal(done.stderr, tmp_path)
    assert said == (f"the database in {tmp_path} has an older MLflow's schema ({older}; the server's MLflow "
                    f"{__import__('mlflow').__version__} needs {head}): copy the folder as a backup while the stack is "
                    f"stopped (cp -a {tmp_path} {tmp_path}.bak), then start it with --upgrade-db (Python: "
                    "upgrade_db=True), which migrates it")
    assert revision_of(tmp_path / "mlflow.db") == older


def test_the_launcher_refuses_a_schema_of_a_newer_mlflow_even_when_asked_to_upgrade(tmp_path: Path) -> None:
    uri, _, _ = older_store(tmp_path)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")

    done = launch(uri, "upgrade", tmp_path)

    assert done.returncode == 78, done.stderr[-2000:]
    assert schema_refusal(done.stderr, tmp_path) == (
        f"the database in {tmp_path} was written by a newer MLflow than the server's "
        f"{__import__('mlflow').__version__} (its schema ffffffffffff is unknown to it): start the stack with that "
        "MLflow version or a later one")
    assert revision_of(tmp_path / "mlflow.db") == "ffffffffffff"


def test_the_launcher_and_the_stack_name_the_schema_check_alike() -> None:
    """The launcher runs where plantml is not installed (the containers' image), so it cannot import the names."""
    import plantml.stack.mlflow_launch as launcher

    assert (launcher.SCHEMA_OPTION, launcher.SCHEMA_MARK) == (SCHEMA_OPTION, SCHEMA_MARK)


@pytest.mark.parametrize("tail", ["", "Error initializing backend store", f"{SCHEMA_MARK}not json",
                                  f'{SCHEMA_MARK}{{"found": "a"}}', f'{SCHEMA_MARK}{{"newer": false}}\nthen more'])
def test_a_log_that_does_not_end_with_the_launchers_refusal_keeps_the_usual_error_and_tail(tail: str) -> None:
    assert schema_refusal(tail, Path("/data")) is None
    spec = ServiceSpec(name="mlflow", command=("python",), folder=Path("/data/mlflow"), port=1, ready=lambda: True,
                       explain_exit=lambda log: schema_refusal(log, Path("/data")))
    error = spec.exited_while_starting("exited while starting (ProcessExitedWithError)", tail)
    assert (error.cause, error.log_tail) == ("exited while starting (ProcessExitedWithError)", tail)


def test_a_cluster_of_a_newer_postgresql_names_its_version_and_no_pg_upgrade() -> None:
    """pg_upgrade moves a cluster to a later major version only: after a downgrade, the way out is the later server."""
    tail = ("2026-12-02 10:06:22.350 UTC [12871] FATAL:  database files are incompatible with server\n"
            "2026-12-02 10:06:22.350 UTC [12871] DETAIL:  The data directory was initialized by PostgreSQL version 16, "
            "which is not compatible with this version 15.18 (Debian 15.18-0+deb12u1).")

    assert version_refusal(tail, Path("/kept/postgres/data")) == (
        "the database in /kept/postgres/data was made by PostgreSQL 16 and this server is PostgreSQL 15: start the stack "
        "with PostgreSQL 16's server (its binaries in PLANTML_PG_BINDIR; with --backend containers, its image in "
        "PLANTML_POSTGRES_IMAGE)")
    assert version_refusal("FATAL:  could not open file \"global/pg_filenode.map\"", Path("/kept")) is None


def test_the_backup_command_of_a_folder_with_a_space_is_quoted_for_the_shell() -> None:
    """Pasted as printed, ``cp -a /srv/ml stacks/team /srv/ml stacks/team.bak`` copied the wrong folders."""
    tail = 'starting\nplantml-mlflow-schema: {"found": "aaa", "expected": "bbb", "mlflow": "3.17.2", "newer": false}\n'
    said = schema_refusal(tail, Path("/srv/ml stacks/team"))
    assert "(cp -a '/srv/ml stacks/team' '/srv/ml stacks/team.bak')" in said
