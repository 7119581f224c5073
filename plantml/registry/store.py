"""Opening the registry's MLflow client, with the store checked first and every failure one line.

MLflow builds its store when the client is made: for ``sqlite:///`` that creates the
database file (and logs ``Creating initial MLflow database tables``), and for other
URIs it can raise anything from a ``FileExistsError`` to a missing database driver.
The registry only reads a store or changes models already in it, so a missing sqlite
file is refused before MLflow can create one, and any other failure becomes one line
naming the URI and where it came from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from plantml.errors import ConfigError, TrackingError, one_line
from plantml.stack.endpoints import mask_url_password

SQLITE_PREFIX = "sqlite:///"
#: How a store says another write inserted the same row first (PostgreSQL through psycopg2, SQLite).
_INSERT_CLASH = ("uniqueviolation", "duplicate key value violates unique constraint", "unique constraint failed")


def describe(uri: str, source: str | None) -> str:
    """``tracking URI 'x' (from argument)`` for the start of an error message."""
    if source is None:
        origin = ""
    elif source == "default":
        origin = " (the default)"
    else:
        origin = f" (from {source})"
    return f"tracking URI {mask_url_password(uri)!r}{origin}"


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
    raise ConfigError(f"{describe(uri, source)}: no MLflow store at {shown} (train first, or give another tracking URI)")


def open_client(uri: str, source: str | None = None) -> Any:
    """An ``MlflowClient`` on ``uri`` (tracking and registry alike), or one :class:`PlantmlError` line."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    check_store_exists(uri, source)
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except ImportError as exc:  # postgresql:// without psycopg, mysql:// without its driver
        raise TrackingError(f"{describe(uri, source)}: needs the Python module {exc.name or exc!s}, "
                            "which is not installed here") from exc
    except MlflowException as exc:  # MLflow refuses this kind of store (file: is in "maintenance mode")
        text = one_line(exc)
        hint = "; MLFLOW_ALLOW_FILE_STORE=true opens it anyway" if "MLFLOW_ALLOW_FILE_STORE" in text else ""
        raise ConfigError(f"{describe(uri, source)}: {text.split('. ')[0]}{hint}") from exc
    except Exception as exc:  # the store is built from a user's URI: a sqlite file that is not one, a driver's own errors
        raise TrackingError(f"{describe(uri, source)}: cannot open the store ({type(exc).__name__}: {one_line(exc)})") from exc


def name_filter(name: str) -> str:
    """An MLflow filter matching model ``name`` (and maybe others, to drop by exact name).

    MLflow's filter parser takes no escapes inside quotes (``'it\\'s'`` matches nothing):
    a name holding ``'`` is quoted with ``"``; one holding both becomes a ``LIKE``
    pattern with ``_`` for each quote and backslash (PostgreSQL's ``LIKE`` escape).
    """
    if "'" not in name:
        return f"name='{name}'"
    if '"' not in name:
        return f'name="{name}"'
    return "name LIKE '" + re.sub(r"['\"\\\\]", "_", name) + "'"


def is_insert_clash(exc: BaseException) -> bool:
    """True when the store refused a write because another one inserted the same row at the same moment."""
    return any(words in str(exc).lower() for words in _INSERT_CLASH)
