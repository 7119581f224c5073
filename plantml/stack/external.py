"""The external backend: a stack someone else started (the compose stack, a team server).

Built from the environment (or a ``.env`` file) and checked before use: the MLflow
server must answer and, where an S3 endpoint is given, the bucket must accept the
credentials. It owns no process, so it starts and stops nothing.
"""

from __future__ import annotations

import os

import requests

from plantml.errors import StackError
from plantml.health import ask_health, health_url, refusal_hint, tls_failure
from plantml.settings import env_value, resolve_tracking_settings
from plantml.stack.base import Stack
from plantml.stack.endpoints import ArtifactMode, StackEndpoints, s3_foreign_answer, s3_tls_hint


class ExternalStack(Stack):
    """A stack described by ``MLFLOW_TRACKING_URI``, ``MLFLOW_S3_ENDPOINT_URL`` and ``AWS_*``."""

    backend = "external"

    def __init__(self, env_file: str | os.PathLike[str] | None = None, bucket: str | None = None) -> None:
        super().__init__()
        self.env_file = env_file
        self.bucket_name = bucket or env_value("PLANTML_S3_BUCKET")

    def start(self, service: str | None = None) -> ExternalStack:
        """Resolve the endpoints and check that they answer; starts nothing."""
        if service is not None:
            raise StackError(service, "an external stack cannot be started or stopped by plantml")
        settings = resolve_tracking_settings(env_file=self.env_file)
        if settings.is_local:
            raise StackError("mlflow", f"MLFLOW_TRACKING_URI is {settings.tracking_uri!r}; an external stack needs an http(s) server URL")
        mode: ArtifactMode = "direct" if settings.s3_endpoint else "proxied"
        endpoints = StackEndpoints(
            tracking_uri=settings.tracking_uri.rstrip("/"), s3_endpoint=settings.s3_endpoint,
            aws_access_key=settings.aws_access_key, aws_secret_key=settings.aws_secret_key,
            bucket=self.bucket_name, artifact_mode=mode,
        )
        check_mlflow(endpoints.tracking_uri)
        if endpoints.s3_endpoint:
            check_bucket(endpoints)
        self._endpoints = endpoints
        return self

    def stop(self, service: str | None = None) -> None:
        """Forget the endpoints; the services themselves are not ours to stop."""
        if service is not None:
            raise StackError(service, "an external stack cannot be started or stopped by plantml")
        self._endpoints = None


def check_mlflow(tracking_uri: str, timeout: float = 5) -> None:
    """Raise :class:`StackError` unless ``<uri>/health`` answers 200 within ``timeout``."""
    try:
        response = ask_health(tracking_uri, timeout)
    except requests.exceptions.SSLError as exc:
        raise StackError("mlflow", f"{tracking_uri}: the TLS handshake failed ({tls_failure(exc)})") from None
    except requests.RequestException as exc:
        raise StackError("mlflow", f"no answer from {tracking_uri} ({type(exc).__name__})") from None
    if response.status_code != 200:
        raise StackError("mlflow", f"{health_url(tracking_uri)} answered HTTP {response.status_code}"
                                   f"{refusal_hint(tracking_uri, response.status_code)}")


def check_bucket(endpoints: StackEndpoints) -> None:
    """Raise :class:`StackError` unless the bucket exists and accepts the credentials."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    client = endpoints.s3_client(retries={"max_attempts": 1})
    try:
        client.head_bucket(Bucket=endpoints.bucket)
    except ClientError as exc:
        if foreign := s3_foreign_answer(exc, endpoints.s3_endpoint):  # its page's 404 is no missing bucket
            raise StackError("s3", foreign) from None
        code = exc.response.get("Error", {}).get("Code", "?")
        cause = {"403": "access denied: the S3 credentials were refused", "404": "does not exist"}.get(code, f"error {code}")
        raise StackError("s3", f"bucket {endpoints.bucket!r} at {endpoints.s3_endpoint}: {cause}") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise StackError("s3", f"{endpoints.s3_endpoint}: no S3 keys: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                               "(environment or .env)") from None
    except BotoCoreError as exc:
        if hint := s3_tls_hint(exc):
            raise StackError("s3", f"{endpoints.s3_endpoint}: the TLS handshake failed (certificate refused){hint}") from None
        raise StackError("s3", f"no answer from {endpoints.s3_endpoint} ({type(exc).__name__})") from None
