"""Settings, resolved in one place into frozen dataclasses.

Resolution order for every tracking setting: explicit argument, then the process
environment, then a ``.env`` file, then the embedded default (MLflow's local
``sqlite:///mlflow.db`` store, so plantml works with no server at all).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from plantml.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT_NAME = "plant_classification"
DEFAULT_BUCKET = "mlflow"

#: Environment variable read for each :class:`TrackingSettings` field.
ENV_NAMES = {
    "tracking_uri": "MLFLOW_TRACKING_URI",
    "experiment_name": "MLFLOW_EXPERIMENT_NAME",
    "s3_endpoint": "MLFLOW_S3_ENDPOINT_URL",
    "aws_access_key": "AWS_ACCESS_KEY_ID",
    "aws_secret_key": "AWS_SECRET_ACCESS_KEY",
}

MASK = "***"


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
    return {k: v for k, v in dotenv_values(env_path).items() if v is not None}


@dataclass(frozen=True)
class TrackingSettings:
    """Where a tracker sends runs and artifacts. Secrets are masked in ``repr``."""

    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment_name: str = DEFAULT_EXPERIMENT_NAME
    s3_endpoint: str | None = None
    aws_access_key: str | None = None
    aws_secret_key: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={mask(getattr(self, f.name)) if f.name == 'aws_secret_key' else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"TrackingSettings({shown})"

    @property
    def is_local(self) -> bool:
        """True when the tracking URI is a local store (no server involved)."""
        return not self.tracking_uri.startswith(("http://", "https://", "databricks"))

    def client_env(self) -> dict[str, str]:
        """The environment variables MLflow's and boto3's clients read for these settings."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        if self.s3_endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        if self.aws_access_key:
            env["AWS_ACCESS_KEY_ID"] = self.aws_access_key
        if self.aws_secret_key:
            env["AWS_SECRET_ACCESS_KEY"] = self.aws_secret_key
        return env

    def with_overrides(self, **overrides: str | None) -> TrackingSettings:
        """A copy with the non-None ``overrides`` applied."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def resolve_tracking_settings(
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    s3_endpoint: str | None = None,
    aws_access_key: str | None = None,
    aws_secret_key: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = None,
) -> TrackingSettings:
    """Resolve every tracking setting: argument, environment, ``.env`` file, default."""
    arguments = {
        "tracking_uri": tracking_uri,
        "experiment_name": experiment_name,
        "s3_endpoint": s3_endpoint,
        "aws_access_key": aws_access_key,
        "aws_secret_key": aws_secret_key,
    }
    environ = os.environ if environ is None else environ
    from_file = read_env_file(env_file)
    resolved: dict[str, str | None] = {}
    for name, value in arguments.items():
        var = ENV_NAMES[name]
        for candidate in (value, environ.get(var), from_file.get(var)):
            if candidate not in (None, ""):
                resolved[name] = candidate
                break
    settings = TrackingSettings(**resolved)
    _check_tracking_uri(settings.tracking_uri)
    return settings


_KNOWN_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql", "mysql", "file:", "databricks")


def _check_tracking_uri(uri: str) -> None:
    if "://" not in uri and not uri.startswith(("file:", "databricks")):
        raise ConfigError(f"tracking URI {uri!r}: expected a URL such as http://127.0.0.1:5001 or sqlite:///mlflow.db")
    if not uri.startswith(_KNOWN_SCHEMES):
        raise ConfigError(f"tracking URI {uri!r}: unknown scheme {uri.split('://')[0]!r} (use http, https, sqlite, postgresql or file)")
