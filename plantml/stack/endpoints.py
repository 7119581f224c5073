"""What a running stack gives its users: endpoints and credentials, secrets masked.

The same object describes a local stack, a containers stack and an external one
(the compose stack, a team server), so tests and tools never care which it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from plantml.errors import ConfigError
from plantml.health import certificate_refused
from plantml.settings import DEFAULT_BUCKET, DEFAULT_EXPERIMENT_NAME, MASK, TrackingSettings, mask, s3_tls_verify
from plantml.text import mask_passwords

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ArtifactMode = Literal["direct", "proxied"]
ARTIFACT_MODES: tuple[ArtifactMode, ...] = ("direct", "proxied")


@dataclass(frozen=True)
class StackEndpoints:
    """Every endpoint and credential of a tracking stack. ``repr`` masks the secrets."""

    tracking_uri: str
    s3_endpoint: str | None
    aws_access_key: str | None
    aws_secret_key: str | None = field(repr=False)
    bucket: str = DEFAULT_BUCKET
    #: Every bucket of the stack (the design's four by default), the artifact bucket first.
    buckets: tuple[str, ...] = (DEFAULT_BUCKET,)
    artifact_mode: ArtifactMode = "direct"
    database_uri: str | None = field(default=None, repr=False)
    #: MLflow basic-auth user of a stack started with ``auth``, else None.
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (
            f"StackEndpoints(tracking_uri={self.tracking_uri!r}, s3_endpoint={self.s3_endpoint!r}, "
            f"aws_access_key={self.aws_access_key!r}, aws_secret_key={MASK!r}, bucket={self.bucket!r}, buckets={self.buckets!r}, "
            f"artifact_mode={self.artifact_mode!r}, database_uri={self.database_uri and mask_passwords(self.database_uri)!r}, "
            f"username={self.username!r}, password={mask(self.password)!r})"
        )

    def client_env(self) -> dict[str, str]:
        """The variables an MLflow/boto3 client needs: what ``plantml stack up`` exports."""
        env = self.tracking_settings().client_env()
        if self.username and self.password:  # read by MLflow's client (and plantml's sender) for basic auth
            env.update({"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password})
        return env

    def tracking_settings(self, experiment_name: str = DEFAULT_EXPERIMENT_NAME) -> TrackingSettings:
        """Tracker settings pointing at this stack."""
        return TrackingSettings(
            tracking_uri=self.tracking_uri,
            experiment_name=experiment_name,
            s3_endpoint=self.s3_endpoint,
            aws_access_key=self.aws_access_key,
            aws_secret_key=self.aws_secret_key,
        )

    def s3_client(self, **config: Any) -> S3Client:
        """A boto3 S3 client for this stack's object store (short timeouts, path-style)."""
        return make_s3_client(self.s3_endpoint, self.aws_access_key, self.aws_secret_key, **config)


def make_s3_client(endpoint: str | None, access_key: str | None, secret_key: str | None, *,
                   session_token: str | None = None, **config: Any) -> S3Client:
    """A boto3 S3 client with short timeouts; ``config`` overrides botocore's Config fields; ``session_token``
    (of temporary keys) goes with the keys, never alone.

    Certificates are checked as by MLflow's S3 client: against ``AWS_CA_BUNDLE`` (boto3 reads it), not at all
    with ``MLFLOW_S3_IGNORE_TLS=true``, so an object store MLflow reaches, plantml's own requests reach too.
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ProfileNotFound

    options = {"connect_timeout": 3, "read_timeout": 30, "retries": {"max_attempts": 2}, "s3": {"addressing_style": "path"}}
    options.update(config)
    # Without both keys boto3 looks for them (environment, ~/.aws) once per session and keeps what it found: with its
    # default session, keys another store's client found earlier in this process would be sent here. A new session
    # (about 0.1 s) reads them as they are now.
    try:
        session = boto3 if access_key and secret_key else boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token if access_key and secret_key else None,
            region_name="us-east-1",
            config=Config(**options),
            verify=s3_tls_verify(),
        )
    except ProfileNotFound as exc:  # boto3 (MLflow's client too) reads the profile's settings even with keys given
        raise ConfigError(f"AWS_PROFILE={exc.kwargs.get('profile')!r}: no such profile in boto3's files "
                          "(~/.aws/config, ~/.aws/credentials, or AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE); "
                          "unset it, or name one of them") from None


def s3_tls_hint(exc: BaseException) -> str:
    """For an S3 request whose server certificate was refused: what gets past it, as for MLflow (else "")."""
    if not certificate_refused(exc):
        return ""
    return "; a private CA: set AWS_CA_BUNDLE to its certificate (or MLFLOW_S3_IGNORE_TLS=true), as for MLflow itself"


def s3_foreign_answer(exc: BaseException, endpoint: str | None) -> str | None:
    """For an S3 request answered with a web page instead of an S3 error (another program's server on the port, a
    proxy's error page): a line saying so, where boto3 gives the bare status (``An error occurred (404) … Not Found``),
    which reads as a missing object or bucket. An S3 server's errors carry an XML body, whose code boto3 gives.
    boto3's error is looked for in ``exc`` and its causes: MLflow wraps it ("Failed to list artifacts in s3://…")."""
    cause: BaseException | None = exc
    for _ in range(8):  # a chain of wrappers, never a cycle's worth
        if cause is None:
            return None
        response = getattr(cause, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        if code.isdigit() and "html" in str(headers.get("content-type", "")).lower():
            return (f"the object store at {endpoint or 'MLFLOW_S3_ENDPOINT_URL'} answered HTTP {code} with a web page, "
                    "which no S3 server sends (another program on this port, a proxy in between?): check "
                    "MLFLOW_S3_ENDPOINT_URL")
        cause = cause.__cause__ or cause.__context__
    return None


#: Object written and read back to tell that the store really serves data.
READY_PROBE_KEY = ".plantml-ready"


def object_store_serves(client: Any, bucket: str) -> bool:
    """True once ``bucket`` accepts the client's keys *and* stores and returns an object.

    SeaweedFS answers bucket requests before its volume server has registered; until
    then writes and reads fail with InternalError. A round trip of a tiny object tells.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=READY_PROBE_KEY, Body=b"ok")
        return client.get_object(Bucket=bucket, Key=READY_PROBE_KEY)["Body"].read() == b"ok"
    except (BotoCoreError, ClientError):
        return False
