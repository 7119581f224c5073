"""What the registry needs of MLflow's store beyond a client (:mod:`plantml.tracking.stores` opens it).

MLflow's filter parser takes no escapes in quoted names, and two promotions at once can
both insert the same row (an alias, a model or version tag): the store then refuses the second.
A model's files live in the object store, which MLflow's S3 client reaches with boto3:
boto3's failures (no keys, an endpoint that refuses or never answers) come through MLflow
unchanged, and are named here as the object store's, not the tracking server's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from plantml.errors import ConfigError, PlantmlError, TrackingError, one_line
from plantml.health import ask_health
from plantml.settings import env_value

#: How a store says another write inserted the same row first (PostgreSQL through psycopg2, SQLite).
_INSERT_CLASH = ("uniqueviolation", "duplicate key value violates unique constraint", "unique constraint failed")


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


#: Runs read at once when listing a model's versions from a tracking server (each is one request, ~20 ms on loopback).
RUN_READERS = 8
#: Runs of one experiment read by one search when listing a model's versions (0: one request per run).
RUNS_PER_SEARCH = 100
#: Searches that found no other run before the rest are read one by one.
SEARCH_MISSES = 3

#: A run id that can go into a search filter as it is (MLflow makes 32 hex digits).
_RUN_ID_RE = re.compile(r"^[0-9A-Za-z_-]+$")


def runs_in_experiment(client: Any, experiment_id: str, run_ids: list[str], per_search: int) -> list[Any]:
    """The runs of ``run_ids`` that experiment ``experiment_id`` holds, deleted ones too, ``per_search`` ids a request."""
    from mlflow.entities import ViewType

    usable = [run_id for run_id in run_ids if _RUN_ID_RE.match(run_id)]
    found: list[Any] = []
    for start in range(0, len(usable), per_search):
        chunk = usable[start:start + per_search]
        quoted = ", ".join(f"'{run_id}'" for run_id in chunk)
        found += client.search_runs([experiment_id], f"attributes.run_id IN ({quoted})", run_view_type=ViewType.ALL,
                                    max_results=len(chunk))
    return found


def read_runs(client: Any, run_ids: list[str], read_one: Callable[[str], Any | None],
              call: Callable[[Callable[[], Any], str], Any], *, over_http: bool) -> dict[str, Any]:
    """The runs of ``run_ids`` that still exist, by id; ``read_one`` reads one run (None: gone), ``call`` makes one store call.

    A run read names its experiment, which most often holds many of the others: they come in
    searches of :data:`RUNS_PER_SEARCH`. Once :data:`SEARCH_MISSES` searches found none (runs
    scattered over experiments), the rest are read one request each, side by side from a server.
    """
    wanted = sorted({run_id for run_id in run_ids if run_id})
    runs: dict[str, Any] = {}
    misses = 0
    while RUNS_PER_SEARCH and len(wanted) > 2 and misses < SEARCH_MISSES:
        first, wanted = read_one(wanted[0]), wanted[1:]
        left = len(wanted)
        if first is not None:
            runs[first.info.run_id] = first
            experiment = first.info.experiment_id
            found = call(lambda: runs_in_experiment(client, experiment, wanted, RUNS_PER_SEARCH),  # noqa: B023 - called at once
                         f"runs of experiment {experiment}")
            runs.update((run.info.run_id, run) for run in found)
            wanted = [run_id for run_id in wanted if run_id not in runs]
        misses += len(wanted) == left
    if not over_http or len(wanted) < 2:
        read = map(read_one, wanted)  # a database store: no round trips to overlap
    else:
        with ThreadPoolExecutor(max_workers=min(RUN_READERS, len(wanted)), thread_name_prefix="plantml-runs") as pool:
            read = list(pool.map(read_one, wanted))
    runs.update((run_id, run) for run_id, run in zip(wanted, read) if run is not None)
    return runs


def is_insert_clash(exc: BaseException) -> bool:
    """True when the store refused a write because another one inserted the same row at the same moment."""
    return any(words in str(exc).lower() for words in _INSERT_CLASH)


def object_store_errors() -> tuple[type[BaseException], ...]:
    """boto3's own failures, which MLflow's S3 client lets through (its timeouts are ``OSError`` too)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def object_store_error(exc: BaseException, what: str) -> PlantmlError:
    """One line for a boto3 failure while reading ``what``'s files, naming the object store."""
    from plantml.stack.endpoints import s3_tls_hint

    endpoint = env_value("MLFLOW_S3_ENDPOINT_URL") or "AWS S3"
    if foreign := object_store_foreign(exc):
        return TrackingError(f"{what}: {foreign}")
    return TrackingError(f"{what}: object store {endpoint} failed ({type(exc).__name__}: {one_line(exc)}){s3_tls_hint(exc)}")


def object_store_foreign(exc: BaseException) -> str | None:
    """:func:`~plantml.stack.endpoints.s3_foreign_answer` for MLflow's object store (``MLFLOW_S3_ENDPOINT_URL``):
    MLflow's "Failed to list artifacts in s3://…: Not Found" would read as a version that is not there."""
    from plantml.stack.endpoints import s3_foreign_answer

    return s3_foreign_answer(exc, env_value("MLFLOW_S3_ENDPOINT_URL"))


def check_s3_access(location: str, what: str) -> None:
    """One line when ``location`` is in S3 and this client has no keys to read it (:class:`ConfigError`), or
    its object store (``MLFLOW_S3_ENDPOINT_URL``) refuses the connection or does not answer (:class:`TrackingError`).

    boto3 would otherwise ask the cloud metadata service, then fail with a bare ``NoCredentialsError``;
    and it gives a silent endpoint 60 s per try, three tries per file listed or downloaded.
    """
    from plantml.tracking.connection import aws_keys_in_files

    if not location.startswith("s3://"):
        return
    has_keys = env_value("AWS_ACCESS_KEY_ID") and env_value("AWS_SECRET_ACCESS_KEY")
    if has_keys or aws_keys_in_files():
        _check_endpoint(what)
        return
    raise ConfigError(f"{what}: its files are at {location} and this client has no S3 keys: set AWS_ACCESS_KEY_ID and "
                      "AWS_SECRET_ACCESS_KEY (and MLFLOW_S3_ENDPOINT_URL for a store other than AWS) in the environment or .env")


#: Connect and read seconds a registry call gives its HTTP server to answer ``/health`` before it is called
#: unreachable: MLflow's own client retries a refused or silent server for about four minutes per call.
REACH_TIMEOUT = (3.0, 10.0)


def _check_endpoint(what: str) -> None:
    """A :class:`TrackingError` naming the object store at ``MLFLOW_S3_ENDPOINT_URL`` when nothing answers there
    in :data:`REACH_TIMEOUT` (AWS itself, with no endpoint set, is not asked: no request leaves for the cloud here)."""
    import requests

    endpoint = env_value("MLFLOW_S3_ENDPOINT_URL")
    if not endpoint:
        return
    try:
        requests.head(endpoint, timeout=REACH_TIMEOUT)  # any answer (403 without a signature) will do
    except requests.exceptions.SSLError:
        return
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise TrackingError(f"{what}: object store {endpoint} failed ({type(exc).__name__}: refused, "
                            f"or no answer within {sum(REACH_TIMEOUT):.0f} s)") from None
    except requests.RequestException:
        return


def server_unreachable(uri: str) -> bool:
    """True when ``uri`` is an HTTP(S) tracking server that refuses the connection or does not answer in time.

    Any answer counts as reachable (a 401, a 503: MLflow's call then says what is wrong), and so
    does a TLS failure, which MLflow's own settings (a CA bundle) may resolve.
    """
    if not uri.startswith(("http://", "https://")):
        return False
    import requests

    try:
        ask_health(uri, REACH_TIMEOUT)
    except requests.exceptions.SSLError:
        return False
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        return True
    except requests.RequestException:
        return False
    return False


def no_server_answered(exc: BaseException) -> bool:
    """True when MLflow's request failed because nothing answered (it raises without chaining the cause)."""
    import requests

    return isinstance(exc.__cause__ or exc.__context__, requests.exceptions.ConnectionError)
