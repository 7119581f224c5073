"""The three services of the tracking stack, described once as data.

Each backend (local processes, containers) reads these descriptions to build its
commands and environments, so the stack means the same thing wherever it runs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from plantml.errors import ConfigError
from plantml.settings import DEFAULT_BUCKET, MASK
from plantml.stack.endpoints import ARTIFACT_MODES, ArtifactMode, StackEndpoints

SERVICE_NAMES = ("postgres", "s3", "mlflow")
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class PostgresSpec:
    """MLflow's metadata database: one user owning one database, password authentication."""

    user: str = "mlflow"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16), repr=False)
    database: str = "mlflow"

    def sqlalchemy_uri(self, host: str, port: int) -> str:
        """The backend store URI for ``mlflow server``.

        ``+psycopg2`` is explicit because SQLAlchemy 2.1 maps a bare ``postgresql://``
        to psycopg 3, which is not installed.
        """
        return f"postgresql+psycopg2://{self.user}:{self.password}@{host}:{port}/{self.database}"


@dataclass(frozen=True)
class S3Spec:
    """The artifact store: S3 credentials (enforced by the server) and the bucket."""

    access_key: str = field(default_factory=lambda: "plantml-" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    bucket: str = DEFAULT_BUCKET

    def __post_init__(self) -> None:
        if not self.access_key or not self.secret_key:
            raise ConfigError("s3: the access key and the secret key must both be non-empty")

    def __repr__(self) -> str:
        return f"S3Spec(access_key={self.access_key!r}, secret_key={MASK!r}, bucket={self.bucket!r})"


@dataclass(frozen=True)
class MLflowServerSpec:
    """The tracking server: how it stores artifacts and how many workers it runs."""

    artifact_mode: ArtifactMode = "direct"
    workers: int = 1
    #: Run MLflow's basic-auth app: every request needs a user (the admin below, to start with).
    auth: bool = False
    admin_username: str = "admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16), repr=False)
    flask_secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    def __post_init__(self) -> None:
        if self.artifact_mode not in ARTIFACT_MODES:
            raise ConfigError(f"artifact mode {self.artifact_mode!r}: expected one of {', '.join(ARTIFACT_MODES)}")

    def server_args(self, backend_uri: str, bucket: str, host: str, port: int) -> list[str]:
        """Arguments after ``mlflow server``.

        ``direct``: the design's ``--default-artifact-root s3://bucket/``, clients write to S3.
        ``proxied``: the server writes to S3 and clients need no S3 credentials.
        """
        args = ["--backend-store-uri", backend_uri, "--host", host, "--port", str(port), "--workers", str(self.workers)]
        if self.artifact_mode == "direct":
            args += ["--default-artifact-root", f"s3://{bucket}/", "--no-serve-artifacts"]
        else:
            args += ["--artifacts-destination", f"s3://{bucket}", "--serve-artifacts"]
        if self.auth:
            args += ["--app-name", "basic-auth"]
        return args

    def server_env(self, s3_endpoint: str, s3: S3Spec) -> dict[str, str]:
        """Environment of the server process: S3 access, the job runner off (slow start here), auth secrets.

        MLflow 3.16+ refuses to start its basic-auth app without an admin password and a
        Flask secret key; both are fresh random values of this stack.
        """
        env = {
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        if self.auth:
            env.update({
                "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_secret_key,
                "MLFLOW_AUTH_ADMIN_USERNAME": self.admin_username,
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            })
        return env


@dataclass(frozen=True)
class StackSpec:
    """The whole stack's description: fresh random credentials unless given."""

    postgres: PostgresSpec = field(default_factory=PostgresSpec)
    s3: S3Spec = field(default_factory=S3Spec)
    mlflow: MLflowServerSpec = field(default_factory=MLflowServerSpec)

    def endpoints(self, *, mlflow_port: int, s3_port: int, postgres_port: int) -> StackEndpoints:
        """What users of a stack started from this description on those loopback ports see."""
        return StackEndpoints(
            tracking_uri=f"http://{LOOPBACK}:{mlflow_port}",
            s3_endpoint=f"http://{LOOPBACK}:{s3_port}",
            aws_access_key=self.s3.access_key,
            aws_secret_key=self.s3.secret_key,
            bucket=self.s3.bucket,
            artifact_mode=self.mlflow.artifact_mode,
            database_uri=self.postgres.sqlalchemy_uri(LOOPBACK, postgres_port),
            username=self.mlflow.admin_username if self.mlflow.auth else None,
            password=self.mlflow.admin_password if self.mlflow.auth else None,
        )


# SeaweedFS ``weed mini`` opens these ports besides S3: each is chosen too, for parallel instances.
SEAWEED_EXTRA_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                       "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")


def seaweed_mini_args(datadir: str, bucket: str, s3_port: int, extra_ports: dict[str, int],
                      ip: str = LOOPBACK, bind: str = LOOPBACK) -> list[str]:
    """Arguments after ``weed mini``: one process serving S3 with the bucket, extras off."""
    return [
        "mini", f"-dir={datadir}", f"-ip={ip}", f"-ip.bind={bind}", f"-bucket={bucket}", "-webdav=false",
        "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", f"-s3.port={s3_port}",
        *(f"-{flag}={port}" for flag, port in extra_ports.items()),
    ]
