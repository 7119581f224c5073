"""Opening an MLflow store from a user's URI, with every failure one line.

MLflow builds its store when a client is made: for ``sqlite:///`` that creates the
database file (and logs ``Creating initial MLflow database tables``), and for other
URIs it can raise anything from a ``FileExistsError`` to a missing database driver.
Commands that only read a store (the registry's, ``plantml ui``) refuse a missing sqlite
file before MLflow can create one; every command turns any other failure into one line
naming the URI (its password masked) and where it came from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from plantml.errors import ConfigError, PlantmlError, TrackingError, one_line
from plantml.settings import bypass_proxies_for_loopback, check_uri_text, describe_uri
from plantml.staging import folder_lock
from plantml.text import mask_passwords

SQLITE_PREFIX = "sqlite:///"
#: Seconds a process waits for another one creating the same sqlite store (MLflow's migrations take a second or two).
CREATION_WAIT_S = 60.0


def sqlite_path(uri: str) -> Path | None:
    """The database file a ``sqlite:///`` URI names, as SQLite will open it (None: not sqlite, or in memory).

    No ``~`` expansion: SQLite takes ``~`` literally, so the check must too.
    """
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri.removeprefix(SQLITE_PREFIX).split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def check_store_exists(uri: str, source: str | None = None) -> None:
    """Refuse a ``sqlite:///`` URI whose file does not exist or is empty (MLflow would create a store there)."""
    path = sqlite_path(uri)
    if path is None or (path.is_file() and path.stat().st_size > 0):
        return
    shown = path.absolute()
    tilde = "; SQLite reads ~ as a folder name, write the full path" if "~" in path.parts else ""
    raise ConfigError(f"{describe_uri(uri, source)}: no MLflow store at {shown} (train first, or give another tracking URI{tilde})")


def _refuse_tilde(uri: str, source: str | None) -> None:
    """A store to be made at ``sqlite:///~/x.db`` would be made in a folder named ``~`` here: refuse it in one line."""
    path = sqlite_path(uri)
    if path is not None and path.parts[:1] == ("~",) and not Path("~").exists():
        raise ConfigError(f"{describe_uri(uri, source)}: SQLite reads ~ as a folder name (it would make {path.absolute()}); "
                          f"write the full path: sqlite:///{path.expanduser()}")


def same_store(first: str, second: str) -> bool:
    """Whether two tracking URIs name the same store: ``http://localhost:5000/`` and ``http://127.0.0.1:5000``
    alike (letter case, a trailing slash, a default port, ``localhost`` for the loopback address), sqlite paths
    alike once normalised."""
    return _store_key(first) == _store_key(second)


def _store_key(uri: str) -> str:
    from urllib.parse import urlsplit

    path = sqlite_path(uri)
    if path is not None:
        return f"{SQLITE_PREFIX}{os.path.normpath(path.absolute())}"
    parts = urlsplit(uri.strip())
    if parts.scheme.lower() not in ("http", "https") or parts.hostname is None:
        return uri.strip().rstrip("/")
    scheme = parts.scheme.lower()
    host = "127.0.0.1" if parts.hostname in ("localhost", "::1") else parts.hostname
    try:
        port = parts.port or {"http": 80, "https": 443}[scheme]
    except ValueError:  # a port that is no number: compared as written
        return uri.strip().rstrip("/")
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


def open_client(uri: str, source: str | None = None, *, must_exist: bool = True) -> Any:
    """An ``MlflowClient`` on ``uri`` (tracking and registry alike), or one :class:`PlantmlError` line.

    ``must_exist`` (commands that only read) refuses a ``sqlite:///`` file that is missing or empty.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    check_uri_text(uri, source)
    bypass_proxies_for_loopback()  # also for a ModelRegistry given its URI, which resolves no settings
    if must_exist:
        check_store_exists(uri, source)
    else:
        _refuse_tilde(uri, source)
    try:
        _check_database(uri, source)
        with _one_creator(sqlite_path(uri)), _quiet_store_creation():
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except ImportError as exc:  # postgresql:// without psycopg, mysql:// without its driver
        raise TrackingError(f"{describe_uri(uri, source)}: needs the Python module {exc.name or exc!s}, "
                            "which is not installed here") from exc
    except MlflowException as exc:  # MLflow refuses this kind of store (file: is in "maintenance mode")
        text = one_line(exc)
        if schema := _SCHEMA.match(text):  # MLflow's advice to upgrade would be lost with its first sentence
            raise ConfigError(f"{describe_uri(uri, source)}: {_schema_advice(uri, schema[1], schema[2])}") from exc
        hint = "; MLFLOW_ALLOW_FILE_STORE=true opens it anyway" if "MLFLOW_ALLOW_FILE_STORE" in text else ""
        raise ConfigError(f"{describe_uri(uri, source)}: {text.split('. ')[0]}{hint}") from exc
    except PlantmlError:  # already one line
        raise
    except Exception as exc:  # the store is built from a user's URI: a sqlite file that is not one, a driver's own errors
        raise TrackingError(f"{describe_uri(uri, source)}: cannot open the store ({type(exc).__name__}: {one_line(exc)})") from exc


_SCHEMA = re.compile(r"Detected out-of-date database schema \(found version (\w+), but expected (\w+)\)")


def _schema_advice(uri: str, found: str, expected: str) -> str:
    """A store whose schema is not this MLflow's: an older MLflow's is upgraded with ``mlflow db upgrade``
    (MLflow's own advice); a newer MLflow's (after a downgrade, a colleague's store) is not, and says so."""
    import mlflow
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError
    from mlflow.store.db.utils import _get_alembic_config

    try:
        ScriptDirectory.from_config(_get_alembic_config(uri)).get_revision(found)
    except CommandError:
        return (f"the store was written by a newer MLflow than this one ({mlflow.__version__}; its schema {found} is "
                "unknown here): use that MLflow version or a later one")
    return (f"the store's schema is an older MLflow's ({found}; MLflow {mlflow.__version__} needs {expected}): back it "
            f"up, then run `mlflow db upgrade {mask_passwords(uri)}`")


#: Seconds to connect to a database named by the tracking URI before saying it does not answer.
DATABASE_CONNECT_S = 3
#: The database servers MLflow stores runs in (``mlflow.store.db.db_types``, sqlite aside: a file, no server).
_DATABASE_SERVERS = ("postgresql", "mysql", "mssql")
#: Those whose drivers take a ``connect_timeout`` (seconds).
_CONNECT_TIMEOUT_DIALECTS = ("postgresql", "mysql")


def _check_database(uri: str, source: str | None) -> None:
    """One connection to the database server a ``postgresql://`` (``mysql://``...) URI names, once: a server that is
    down, a wrong password or database is then one line in seconds. MLflow's own store retries any failure to connect
    ten times, 100 s, with a warning of several lines each time."""
    if uri.partition("://")[0].partition("+")[0].lower() not in _DATABASE_SERVERS:
        return  # decided before importing SQLAlchemy (0.2 s), which a server's or a sqlite URI's commands need not pay
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot read: MLflow says what it makes of it
        return
    options = {"connect_timeout": DATABASE_CONNECT_S} if url.get_backend_name() in _CONNECT_TIMEOUT_DIALECTS else {}
    engine = sqlalchemy.create_engine(url, connect_args=options, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as exc:  # the driver's own words: refused, timeout expired, authentication failed
        reason = one_line(exc.orig) if exc.orig is not None else one_line(exc)
        raise TrackingError(f"{describe_uri(uri, source)}: the database does not answer or refuses the connection "
                            f"({reason})") from None
    finally:
        engine.dispose()


#: The most experiments one MLflow run search takes.
SEARCH_RUNS_MAX_EXPERIMENTS = 100


def search_batches(experiment_ids: list[str]) -> Iterator[list[str]]:
    """``experiment_ids`` in lists that one ``search_runs`` call takes."""
    for start in range(0, len(experiment_ids), SEARCH_RUNS_MAX_EXPERIMENTS):
        yield experiment_ids[start:start + SEARCH_RUNS_MAX_EXPERIMENTS]


def all_experiments(client: Any, page_size: int = 1000) -> list[Any]:
    """Every active experiment of ``client``'s store, the most recently updated first (every page: MLflow's
    ``search_experiments()`` gives the first 1,000)."""
    found: list[Any] = []
    token = None
    while True:
        page = client.search_experiments(order_by=["last_update_time DESC"], max_results=page_size, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


@contextlib.contextmanager
def _quiet_store_creation() -> Iterator[None]:
    """MLflow logs two INFO lines ("Creating initial MLflow database tables...") when it makes a sqlite store:
    the first lines a new user's first ``plantml train`` would print. Its warnings still show."""
    creation_log = logging.getLogger("mlflow.store.db.utils")
    level = creation_log.level
    creation_log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        creation_log.setLevel(level)


@contextlib.contextmanager
def _one_creator(path: Path | None) -> Iterator[None]:
    """Hold the lock of ``path``'s folder while a sqlite store that is missing (or empty) is created.

    Two processes creating one store at once (``for lr in …; do plantml train … & done`` in a new
    folder) both run MLflow's migrations, and one fails ("table … already exists"). The second
    waits here instead, then opens the store the first made. Best effort: a folder that cannot be
    opened or locked in time is left to MLflow's own error.
    """
    if path is None or (path.is_file() and path.stat().st_size > 0):
        yield
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(folder_lock(path.absolute().parent, CREATION_WAIT_S))
        except OSError:
            pass  # a folder that cannot be opened or locked: MLflow says what is wrong with it
        yield
