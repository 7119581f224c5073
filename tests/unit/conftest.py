"""The unit tests' MLflow stores: every fresh sqlite store a test makes in its own process gets MLflow's schema
copied from one that MLflow itself made at the start of the session, rather than running MLflow's sixty-odd
migrations again (1 to 2 CPU-seconds a store; four of these files took 98 s without the copy, 52 s with it).

The copy is MLflow's own schema of this MLflow version, byte for byte (sqlite's backup API), so the store each
test works on is the one MLflow would have made. Stores made by the commands the tests run as processes, and
the integration tests' PostgreSQL stores, are made by MLflow as always.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True, scope="session")
def _mlflow_schema_from_one_made_by_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    try:
        import mlflow.store.db.utils as db_utils
        import mlflow.store.model_registry.sqlalchemy_store as registry_store
        import sqlalchemy
    except ImportError:  # a CUDA runner's Python for `pytest -m gpu` may have torch and no MLflow
        yield
        return

    make_schema = db_utils._initialize_tables
    made = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{made}")
    make_schema(engine)
    engine.dispose()

    def copy_schema(engine: Any) -> None:
        if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
            return make_schema(engine)
        connection = engine.raw_connection()
        try:
            with sqlite3.connect(made) as source:
                source.backup(connection.driver_connection)
        finally:
            connection.close()
        return None

    patch = pytest.MonkeyPatch()
    patch.setattr(db_utils, "_initialize_tables", copy_schema)  # the tracking store calls it through the module
    patch.setattr(registry_store, "_initialize_tables", copy_schema)  # the registry store imported it by name
    yield
    patch.undo()


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_as_python_sets_it() -> Iterator[None]:
    """SIGINT raising KeyboardInterrupt, as Python sets it in a terminal: a suite started in the background by a
    shell (``tox &``, ``nohup``) inherits SIGINT ignored, and the tests of what Ctrl-C does would see nothing."""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def killed_leftover(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Give the test a temporary folder of its own (``tempfile.gettempdir()``), and a function that leaves in it the
    staging folder ``NAME`` of a plantml process that is gone, with a file, as a ``kill -9`` leaves it; the function
    returns that temporary folder."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    def leave(name: str) -> Path:
        ended = subprocess.Popen([sys.executable, "-c", "pass"])
        ended.wait()
        left = temp / f".{name}.staging-{ended.pid}-12345-abc123de" / "sub"
        left.mkdir(parents=True)
        (left / "weights.pth").write_bytes(b"what a process killed with -9 was writing")
        return temp
    return leave


@pytest.fixture()
def files_of_at_most_one_mib() -> Iterator[None]:
    """Writes past 1 MiB fail in this process as on a full disk (EFBIG, which torch's own writer gets too)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
