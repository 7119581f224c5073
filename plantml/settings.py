"""Settings, resolved in one place into frozen dataclasses.

Every environment variable plantml reads is a row of :data:`VARIABLES` (name, default,
what it sets); code reads one only through :func:`env_value`, and the pytest plugin's
options and the table of docs/settings.md come from the same rows.

Resolution order for every tracking setting: explicit argument, then the process
environment, then a ``.env`` file, then the embedded default (MLflow's local
``sqlite:///mlflow.db`` store, so plantml works with no server at all). Where each
value came from is kept in :attr:`TrackingSettings.sources`, so an error can say.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from plantml.errors import ConfigError, UsageError, no_home_reason, os_reason
from plantml.text import MASK, NOT_UTF8, is_utf8, mask_passwords, safe_text

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT_NAME = "plant_classification"
DEFAULT_BUCKET = "mlflow"
#: The design's buckets: MLflow's artifacts, models, plant images, data sets.
DEFAULT_BUCKETS = "mlflow,models,plants-images,data"


@dataclass(frozen=True)
class Variable:
    """One environment variable plantml reads: its name, default and what it sets."""

    name: str
    default: str | None
    group: str
    help: str


#: Every environment variable plantml reads, by group. ``None``: no fixed default (the help says).
VARIABLES: dict[str, Variable] = {v.name: v for v in (
    Variable("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI, "tracking", "tracking server URL or local store"),
    Variable("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT_NAME, "tracking", "experiment of training runs"),
    Variable("MLFLOW_S3_ENDPOINT_URL", None, "tracking", "S3 endpoint of the artifact store (direct artifact mode)"),
    Variable("AWS_ACCESS_KEY_ID", None, "tracking", "S3 access key"),
    Variable("AWS_SECRET_ACCESS_KEY", None, "tracking", "S3 secret key (never shown)"),
    Variable("AWS_SESSION_TOKEN", None, "tracking", "session token of temporary S3 keys, used only with keys from the "
             "same place (argument, environment or .env; never shown)"),
    Variable("MLFLOW_S3_IGNORE_TLS", "false", "tracking", "true: S3 certificates are not checked, as by MLflow's client "
             "(a private CA: set AWS_CA_BUNDLE to its certificate instead)"),
    Variable("MLFLOW_TRACKING_USERNAME", None, "tracking", "user of a tracking server with basic auth (`stack up --auth`)"),
    Variable("MLFLOW_TRACKING_PASSWORD", None, "tracking", "that user's password (never shown)"),
    Variable("MLFLOW_TRACKING_TOKEN", None, "tracking", "bearer token of a tracking server behind a token gateway (never shown)"),
    Variable("PLANTML_VERIFY_EXPERIMENT", "plantml_verification", "tracking", "experiment of `plantml verify` runs"),
    Variable("PLANTML_DELIVERY_TIMEOUT", "60", "delivery", "seconds end_run waits for delivery"),
    Variable("PLANTML_MAX_BUFFERED", "100000", "delivery", "entries the sender keeps in memory"),
    Variable("PLANTML_MAX_BACKOFF", "5", "delivery", "longest wait between retries, in seconds"),
    Variable("PLANTML_LINGER", "1", "delivery", "seconds a part-filled batch waits for company"),
    Variable("PLANTML_REQUEST_TIMEOUT", "10", "delivery", "seconds one request to the tracking server may take"),
    Variable("PLANTML_SIGNAL_TIMEOUT", "10", "delivery", "seconds a run ended by SIGTERM, SIGHUP or SIGINT waits for delivery"),
    Variable("PLANTML_JOURNAL_DIR", None, "delivery", "folder of run journals (write-ahead logs); unset: `journal` in PLANTML_CACHE_DIR"),
    Variable("PLANTML_JOURNAL_COMPACT_MB", "64", "delivery", "MiB a run's journal grows by before it is written again without what the server has"),
    Variable("PLANTML_CACHE_DIR", "~/.cache/plantml", "data", "folder of the synthetic set, downloaded data sets, image folders' scan records and the records of running stacks"),
    Variable("MPLCONFIGDIR", None, "data", "matplotlib's settings and font cache (the run's figures); unset and HOME not "
             "writable: `matplotlib` in PLANTML_CACHE_DIR"),
    Variable("PLANTML_STACK", "local", "stack", "backend of the pytest stack fixtures: local, containers or external"),
    Variable("PLANTML_PG_BINDIR", None, "stack", "folder of PostgreSQL's initdb and postgres (found by itself)"),
    Variable("PLANTML_PG_USER", "postgres", "stack", "account that runs PostgreSQL when plantml runs as root"),
    Variable("PLANTML_HEALTH_WINDOW", "120", "stack", "seconds a running service may fail its readiness check (hung, "
             "paused) before the supervisor kills and restarts it; 0: never"),
    Variable("PLANTML_S3_BUCKET", DEFAULT_BUCKET, "stack", "artifact bucket of an external stack"),
    Variable("PLANTML_S3_BUCKETS", DEFAULT_BUCKETS, "stack", "buckets every stack creates (the artifact bucket always)"),
    Variable("PLANTML_S3_FLAVOUR", "seaweedfs", "stack", "object store: seaweedfs or minio"),
    Variable("PLANTML_POSTGRES_IMAGE", None, "containers", "PostgreSQL image (default: the one build-images makes)"),
    Variable("PLANTML_S3_IMAGE", None, "containers", "object store image (default: the one build-images makes)"),
    Variable("PLANTML_MLFLOW_IMAGE", None, "containers", "MLflow server image (default: the one build-images makes)"),
    Variable("PLANTML_CONTAINER_NETWORK", "auto", "containers", "auto, host or bridge"),
    Variable("RANK", "0", "distributed", "this process's rank in a torchrun job (torchrun sets it)"),
    Variable("WORLD_SIZE", "1", "distributed", "processes in the torchrun job (torchrun sets it)"),
    Variable("LOCAL_RANK", "0", "distributed", "rank on this machine, which picks the GPU (torchrun sets it)"),
    Variable("MASTER_ADDR", None, "distributed", "host of rank 0's rendezvous store in a torchrun job (torchrun sets it)"),
    Variable("MASTER_PORT", None, "distributed", "port of that store (torchrun sets it)"),
    Variable("OMP_NUM_THREADS", None, "distributed", "CPU threads per process; `plantml train --nproc` sets 1 where unset, as torchrun does"),
    Variable("PLANTML_COLLECTIVE_TIMEOUT", None, "distributed", "seconds a rank waits in a collective for a silent peer "
             "(hung, stopped) before its training fails naming it (default: torch's, 30 min on gloo, 10 on NCCL)"),
    Variable("PLANTML_LAUNCHER_PID", None, "distributed", "set by `plantml train --nproc` for its ranks, which stop when that process dies"),
    Variable("HTTP_PROXY", None, "network", "proxy of HTTP requests (also `HTTPS_PROXY`, `ALL_PROXY`, lower-case too), "
             "for every host but the loopback: see NO_PROXY"),
    Variable("NO_PROXY", None, "network", "hosts reached without the proxy (also `no_proxy`); where a proxy is set, "
             "plantml adds `127.0.0.1,localhost,::1,[::1]`: a proxy cannot reach this machine's loopback, where its stacks "
             "and tests live"),
    Variable("PLANTML_TEST_FAIL_AT", None, "testing", "tests only: `RANK:EPOCH` makes that rank raise as that epoch starts"),
)}


def env_value(name: str, explicit: Any = None, environ: Mapping[str, str] | None = None) -> str | None:
    """``explicit`` if given, else the variable ``name`` from the environment (empty counts as
    unset), else its default from :data:`VARIABLES`. The one place plantml reads its variables."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not in plantml.settings.VARIABLES")
    if explicit not in (None, ""):
        return str(explicit)
    value = (os.environ if environ is None else environ).get(name)
    return value if value not in (None, "") else VARIABLES[name].default


def s3_tls_verify(environ: Mapping[str, str] | None = None) -> bool | None:
    """The ``verify`` MLflow's S3 client gives boto3: False when ``MLFLOW_S3_IGNORE_TLS`` is true, else None
    (boto3 then checks certificates against ``AWS_CA_BUNDLE`` or its own bundle); a value MLflow refuses is a
    one-line :class:`ConfigError`."""
    text = str(env_value("MLFLOW_S3_IGNORE_TLS", environ=environ)).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ConfigError(f"MLFLOW_S3_IGNORE_TLS={text!r}: expected true, false, 1 or 0 (as MLflow reads it)")
    return False if text in ("true", "1") else None


def env_number(name: str, explicit: Any = None, kind: type = float, environ: Mapping[str, str] | None = None, *,
               minimum: float | None = None, above: bool = False) -> Any:
    """:func:`env_value` as a finite number of ``kind``, at least ``minimum`` (or ``above`` it); anything
    else (malformed, ``nan``, ``inf``, out of range) is a one-line :class:`ConfigError` naming the variable."""
    text = env_value(name, explicit, environ)
    try:
        value = kind(text)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name}={text!r}: expected {'a whole number' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={text!r}: expected a finite number")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise ConfigError(f"{name}={text!r}: must be {'above' if above else 'at least'} {minimum:g}")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` as seconds; a one-line :class:`UsageError` otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"duration {text!r}: expected a number with an optional unit s, m, h or d (e.g. 10m)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def env_path(name: str, explicit: Any = None, environ: Mapping[str, str] | None = None) -> Path | None:
    """:func:`env_value` as a path with ``~`` expanded (None when unset and without default); a ``~`` with no home to
    expand to (HOME unset, an account with no ``/etc/passwd`` line: ``docker run --user UID``) is a ConfigError."""
    text = env_value(name, explicit, environ)
    try:
        return None if text is None else Path(text).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        raise ConfigError(f"{name} {text}: no home folder to put it in ({no_home_reason()}): set HOME, or {name} to a "
                          "folder") from None


#: Every variable that sends HTTP through a proxy, as requests, botocore and urllib read them.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
#: What plantml adds to ``no_proxy`` where a proxy is set.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")  # urllib and botocore compare "[::1]:8333" bracketed


def bypass_proxies_for_loopback(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Where a proxy variable is set, add :data:`LOOPBACK_HOSTS` to ``no_proxy`` and ``NO_PROXY`` (those missing,
    after the user's own hosts), so that requests, botocore and urllib (MLflow's and boto3's clients too) reach
    127.0.0.1 directly, as Go's clients and browsers do: a proxy on another machine cannot reach this one's
    loopback, and test traffic must stay on it. Returns what it set (nothing without a proxy). Called where plantml
    starts a stack, resolves tracking settings or opens a store, and by the pytest plugin."""
    environ = os.environ if environ is None else environ
    if not any(environ.get(name) for name in PROXY_VARIABLES):
        return {}
    current = environ.get("no_proxy") or environ.get("NO_PROXY") or ""  # requests and urllib read the lower first
    hosts = [host.strip() for host in current.split(",") if host.strip()]
    if "*" in hosts:
        return {}
    value = ",".join([*hosts, *(host for host in LOOPBACK_HOSTS if host not in hosts)])
    changed = {name: value for name in ("no_proxy", "NO_PROXY") if environ.get(name) != value}
    environ.update(changed)
    return changed


def cache_dir() -> Path:
    """plantml's cache folder: ``$PLANTML_CACHE_DIR``, else ``~/.cache/plantml`` (the synthetic set, pulled sets, scan records,
    image wheelhouses, the records of running stacks, and by default the run journals and matplotlib's folder)."""
    return env_path("PLANTML_CACHE_DIR")  # type: ignore[return-value]  # it has a default


def mask(secret: str | None) -> str | None:
    """Return a fixed mask for a secret (``None`` stays ``None``)."""
    return None if secret is None else MASK


def read_env_file(path: str | os.PathLike[str] | None) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines of a ``.env`` file (``export`` prefixes and quotes allowed).

    A missing file gives an empty mapping when ``path`` is None (the implicit ``.env``),
    and a :class:`ConfigError` when the caller named it.
    """
    from dotenv import dotenv_values

    implicit = path is None
    env_path = Path(".env") if implicit else Path(path)
    if not env_path.is_file():
        if implicit:
            return {}
        raise ConfigError(f"env file {env_path}: not found")
    where = f".env in {Path.cwd()}" if implicit else f"env file {env_path}"
    try:
        values = dotenv_values(env_path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({os_reason(exc)})") from None
    return {k: v for k, v in values.items() if v is not None}


#: MLflow's client reads its credentials only from the environment: the command line and
#: the tracker copy them from the env file they read.
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def export_env_file_credentials(environ: MutableMapping[str, str] | None = None, *,
                                env_file: str | os.PathLike[str] | None = None) -> None:
    """Copy :data:`CREDENTIAL_VARIABLES` from ``env_file`` (``.env``) into ``environ`` (``os.environ``) where
    unset, so every MLflow client of this process authenticates as ``plantml stack up --auth`` wrote there."""
    environ = os.environ if environ is None else environ
    if all(environ.get(name) for name in CREDENTIAL_VARIABLES):
        return
    from_file = read_env_file(env_file)
    for name in CREDENTIAL_VARIABLES:
        if not environ.get(name) and from_file.get(name):
            environ[name] = from_file[name]


@dataclass(frozen=True)
class TrackingSettings:
    """Where a tracker sends runs and artifacts. Secrets are masked in ``repr``.

    ``sources`` says where each resolved field came from (``argument``,
    ``environment (MLFLOW_TRACKING_URI)``, ``.env in /some/folder``); fields left at their
    default have no entry.
    """

    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment_name: str = DEFAULT_EXPERIMENT_NAME
    s3_endpoint: str | None = None
    aws_access_key: str | None = None
    aws_secret_key: str | None = field(default=None, repr=False)
    #: The session token of temporary keys: only from where the keys came from (see :func:`resolve_tracking_settings`).
    aws_session_token: str | None = field(default=None, repr=False)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sources"}
        shown.update(tracking_uri=mask_passwords(self.tracking_uri), aws_secret_key=mask(self.aws_secret_key),
                     aws_session_token=mask(self.aws_session_token))
        return f"TrackingSettings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @property
    def is_local(self) -> bool:
        """True when the tracking URI is a local store (no server involved)."""
        return not self.tracking_uri.startswith(("http://", "https://", "databricks"))

    def source_of(self, name: str = "tracking_uri") -> str:
        """Where field ``name`` came from, as words for an error message (``default`` when unset)."""
        return self.sources.get(name, "default")

    def client_env(self) -> dict[str, str]:
        """The environment variables MLflow's and boto3's clients read for these settings."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        if self.s3_endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        if self.aws_access_key:
            env["AWS_ACCESS_KEY_ID"] = self.aws_access_key
        if self.aws_secret_key:
            env["AWS_SECRET_ACCESS_KEY"] = self.aws_secret_key
        if self.aws_access_key:  # with keys, their token or none (empty: botocore reads the legacy name first)
            env.update(AWS_SESSION_TOKEN=self.aws_session_token or "", AWS_SECURITY_TOKEN="")
        return env

    def with_overrides(self, **overrides: str | None) -> TrackingSettings:
        """A copy with the non-None ``overrides`` applied (their source: ``argument``)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given, sources={**self.sources, **dict.fromkeys(given, "argument")})


#: Environment variable read for each :class:`TrackingSettings` field.
ENV_NAMES = {
    "tracking_uri": "MLFLOW_TRACKING_URI",
    "experiment_name": "MLFLOW_EXPERIMENT_NAME",
    "s3_endpoint": "MLFLOW_S3_ENDPOINT_URL",
    "aws_access_key": "AWS_ACCESS_KEY_ID",
    "aws_secret_key": "AWS_SECRET_ACCESS_KEY",
}


def resolve_tracking_settings(
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    s3_endpoint: str | None = None,
    aws_access_key: str | None = None,
    aws_secret_key: str | None = None,
    *,
    aws_session_token: str | None = None,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = None,
) -> TrackingSettings:
    """Resolve every tracking setting: argument, environment, ``.env`` file, default.

    ``AWS_SESSION_TOKEN`` is taken only from where the access key came from: a token the shell keeps for other
    keys (an AWS SSO login, a CI runner's cloud role) would be sent with a stack's keys from ``.env``, and refused
    (``InvalidAccessKeyId``)."""
    arguments = {
        "tracking_uri": tracking_uri,
        "experiment_name": experiment_name,
        "s3_endpoint": s3_endpoint,
        "aws_access_key": aws_access_key,
        "aws_secret_key": aws_secret_key,
    }
    if environ is None:
        bypass_proxies_for_loopback()
    environ = os.environ if environ is None else environ
    from_file = read_env_file(env_file)
    file_words = f".env in {Path.cwd()}" if env_file is None else f"env file {Path(env_file).resolve()}"

    def candidates(value: str | None, var: str) -> tuple[tuple[str | None, str], ...]:
        """Where a setting may come from, in order: the argument, the environment, the file."""
        return (value, "argument"), (environ.get(var), f"environment ({var})"), (from_file.get(var), f"{var} in {file_words}")

    resolved: dict[str, str] = {}
    sources: dict[str, str] = {}
    origins: dict[str, int] = {}
    for name, value in arguments.items():
        for origin, (candidate, source) in enumerate(candidates(value, ENV_NAMES[name])):
            if candidate not in (None, ""):
                resolved[name], sources[name], origins[name] = candidate, source, origin
                break
    if "aws_access_key" in origins:
        token = candidates(aws_session_token, "AWS_SESSION_TOKEN")[origins["aws_access_key"]][0]
        if token:
            resolved["aws_session_token"], sources["aws_session_token"] = token, sources["aws_access_key"]
    settings = TrackingSettings(**resolved, sources=sources)
    _check_tracking_uri(settings)
    _check_s3_endpoint(settings)
    return settings


_KNOWN_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql", "mysql", "file:", "databricks")


def describe_uri(uri: str, source: str | None) -> str:
    """``tracking URI 'x' (from argument)``, its password masked, for the start of an error message."""
    if source is None:
        origin = ""
    elif source == "default":
        origin = " (the default)"
    else:
        origin = f" (from {source})"
    return f"tracking URI {mask_passwords(uri)!r}{origin}"


def check_uri_text(uri: str, source: str | None) -> None:
    """Refuse a tracking URI holding bytes that are not UTF-8 (typed in a Latin-1 shell): no store or server takes
    it, and MLflow would fail on it with a codec's error, or retry it for minutes."""
    if not is_utf8(uri):
        raise ConfigError(f"{describe_uri(safe_text(uri), source)}: {NOT_UTF8}")


def _check_tracking_uri(settings: TrackingSettings) -> None:
    uri = settings.tracking_uri
    check_uri_text(uri, settings.source_of())
    shown = describe_uri(uri, settings.source_of())
    if "://" not in uri and not uri.startswith(("file:", "databricks")):
        raise ConfigError(f"{shown}: expected a URL such as http://127.0.0.1:5001 or sqlite:///mlflow.db")
    if uri.startswith("sqlite://") and not uri.startswith("sqlite:///"):
        raise ConfigError(f"{shown}: a sqlite URI has three slashes before a relative path "
                          "(sqlite:///mlflow.db) and four before an absolute one (sqlite:////srv/mlflow.db)")
    if not uri.startswith(_KNOWN_SCHEMES):
        raise ConfigError(f"{shown}: unknown scheme {uri.split('://')[0]!r} (use http, https, sqlite, postgresql or file)")


def _check_s3_endpoint(settings: TrackingSettings) -> None:
    """Refuse an S3 endpoint boto3 would reject with a traceback (``127.0.0.1:9`` without its scheme)."""
    from urllib.parse import urlsplit

    endpoint = settings.s3_endpoint
    if endpoint is None:
        return
    try:
        parts = urlsplit(endpoint)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number, or out of range
        usable = False
    if not usable:
        raise ConfigError(f"S3 endpoint {endpoint!r} (from {settings.source_of('s3_endpoint')}): "
                          "expected a URL such as http://127.0.0.1:8333")


def variables_table() -> str:
    """:data:`VARIABLES` as the Markdown table docs/settings.md shows (a unit test keeps them equal)."""
    rows = ["| variable | default | what it sets |", "| --- | --- | --- |"]
    for variable in VARIABLES.values():
        default = f"`{variable.default}`" if variable.default is not None else "-"
        rows.append(f"| `{variable.name}` | {default} | {variable.help} |")
    return "\n".join(rows)
