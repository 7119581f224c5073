"""The MLflow tracking server, described once for both runners.

The backend store URI (it holds the database password) goes in the server's
environment (``MLFLOW_BACKEND_STORE_URI``, which ``mlflow server`` reads), never on its
command line, which ``ps`` shows to every local user.
"""

from __future__ import annotations

import json
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import requests

from plantml.errors import ConfigError
from plantml.health import health_url
from plantml.stack.endpoints import ARTIFACT_MODES, ArtifactMode
from plantml.stack.postgres import PostgresSpec
from plantml.stack.s3 import S3Spec
from plantml.stack.service import Network, ServiceSpec


@dataclass(frozen=True)
class MLflowServerSpec:
    """The tracking server: how it stores artifacts, how many workers it runs, whether it asks for a user."""

    artifact_mode: ArtifactMode = "direct"
    workers: int = 1
    #: Run MLflow's basic-auth app: every request needs a user (the admin below, to start with).
    auth: bool = False
    admin_username: str = "admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16), repr=False)
    flask_secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    #: Migrate a kept database of an older MLflow's schema to this MLflow's before serving it (else refused).
    upgrade_schema: bool = False

    def __post_init__(self) -> None:
        if self.artifact_mode not in ARTIFACT_MODES:
            raise ConfigError(f"artifact mode {self.artifact_mode!r}: expected one of {', '.join(ARTIFACT_MODES)}")

    def server_args(self, bucket: str, host: str, port: int) -> list[str]:
        """Arguments after ``mlflow server`` (no secret among them).

        ``direct``: the design's ``--default-artifact-root s3://bucket/``, clients write to S3.
        ``proxied``: the server writes to S3 and clients need no S3 credentials.
        """
        args = ["--host", host, "--port", str(port), "--workers", str(self.workers)]
        if self.artifact_mode == "direct":
            args += ["--default-artifact-root", f"s3://{bucket}/", "--no-serve-artifacts"]
        else:
            args += ["--artifacts-destination", f"s3://{bucket}", "--serve-artifacts"]
        if self.auth:
            args += ["--app-name", "basic-auth"]
        return args

    def server_env(self, backend_uri: str, s3_endpoint: str, s3: S3Spec) -> dict[str, str]:
        """Environment of the server process: the backend store, S3 access, the job runner off, auth secrets.

        The job runner takes 11 to 30 s to start on two cores and plantml needs none of it.
        MLflow 3.16+ refuses to start its basic-auth app without an admin password and a
        Flask secret key; both are random values of this stack.
        """
        env = {
            "MLFLOW_BACKEND_STORE_URI": backend_uri,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_TRACKING_URI": "",  # the server's own client settings must not leak in from the caller
        }
        if self.auth:
            env.update({
                "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_secret_key,
                "MLFLOW_AUTH_ADMIN_USERNAME": self.admin_username,
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            })
        return env


def mlflow_service(spec: MLflowServerSpec, folder: Path, port: int, network: Network, postgres: PostgresSpec,
                   postgres_port: int, s3: S3Spec, s3_port: int) -> ServiceSpec:
    """``mlflow server`` on ``port``, on the stack's PostgreSQL and S3, run as one process by the launcher file
written into its folder (which also holds the auth database)."""
    backend_uri = postgres.sqlalchemy_uri(network.host_of("postgres"), postgres_port)
    s3_endpoint = f"http://{network.host_of('s3')}:{s3_port}"

    def ready() -> bool:
        try:
            # the server's own readiness, over loopback http: no client credential or TLS setting of the caller's
            return requests.get(health_url(f"http://127.0.0.1:{port}"), timeout=2).status_code == 200
        except requests.RequestException:
            return False

    schema = f"{SCHEMA_OPTION}{'upgrade' if spec.upgrade_schema else 'check'}"
    return ServiceSpec(
        name="mlflow", command=("python", str(folder / LAUNCHER), schema, "server", *spec.server_args(s3.bucket, network.bind, port)),
        folder=folder, port=port, ports={"mlflow": port}, ready=ready,
        env=spec.server_env(backend_uri, s3_endpoint, s3), start_timeout=90,
        files={LAUNCHER: launcher_source()}, explain_exit=lambda log_tail: schema_refusal(log_tail, folder.parent),
    )


#: The launcher's option that checks (or upgrades) the database's schema, and the line it exits with when it
#: refuses one (:mod:`plantml.stack.mlflow_launch`, which cannot import plantml, says the same).
SCHEMA_OPTION = "--plantml-schema="
SCHEMA_MARK = "plantml-mlflow-schema: "


def schema_refusal(log_tail: str, data_dir: Path) -> str | None:
    """What to do about the kept database in ``data_dir`` whose schema the server refused (its log ends with
    :data:`SCHEMA_MARK`); None when its log says something else."""
    last = log_tail.strip().rpartition("\n")[2].strip()
    if not last.startswith(SCHEMA_MARK):
        return None
    try:
        facts = json.loads(last[len(SCHEMA_MARK):])
        found, expected, version, newer = (str(facts["found"]), str(facts["expected"]), str(facts["mlflow"]),
                                           facts["newer"] is True)
    except (ValueError, KeyError, TypeError):
        return None
    if newer:
        return (f"the database in {data_dir} was written by a newer MLflow than the server's {version} (its schema "
                f"{found} is unknown to it): start the stack with that MLflow version or a later one")
    return (f"the database in {data_dir} has an older MLflow's schema ({found}; the server's MLflow {version} needs "
            f"{expected}): copy the folder as a backup while the stack is stopped (cp -a {shlex.quote(str(data_dir))} "
            f"{shlex.quote(f'{data_dir}.bak')}), then start it with --upgrade-db (Python: upgrade_db=True), which migrates it")


#: The file, in the service's folder, that runs ``mlflow server`` as one process (see :mod:`plantml.stack.mlflow_launch`).
LAUNCHER = "mlflow_launch.py"


#: :mod:`plantml.stack.mlflow_launch` as a file: ``plantml ui`` runs it where it lies, a stack from a copy in its folder.
LAUNCHER_PATH = Path(__file__).with_name(LAUNCHER)


def launcher_source() -> str:
    """The text of :mod:`plantml.stack.mlflow_launch`, which a container without plantml runs as well."""
    return LAUNCHER_PATH.read_text(encoding="utf-8")
