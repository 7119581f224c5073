"""First contact with the tracking server: reachable in bounded time, the experiment opened or created."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from plantml.errors import ConfigError, PlantmlError, TrackingError, one_line
from plantml.health import ServerSession, ask_health, tls_failure, tls_reason
from plantml.settings import TrackingSettings
from plantml.text import mask_passwords


def connect(settings: TrackingSettings, timeout: float) -> tuple[Any, str]:
    """An ``MlflowClient`` bound to ``settings.tracking_uri`` and the id of its experiment (created when missing).

    An HTTP server that does not answer within ``timeout`` seconds is a one-line
    :class:`TrackingError` naming it (MLflow's own client would retry for about four minutes).
    """
    if settings.tracking_uri.startswith(("http://", "https://")):
        wait_for_server(settings.tracking_uri, timeout, settings.source_of("tracking_uri"))
    from plantml.tracking.stores import open_client

    # a training may create its local store; any store MLflow cannot open is one line
    client = open_client(settings.tracking_uri, settings.source_of("tracking_uri"), must_exist=False)
    return client, open_experiment(client, settings)


def wait_for_server(uri: str, timeout: float, source: str = "default") -> None:
    """Raise TrackingError naming ``uri``, and where it came from, unless its server answers within ``timeout`` seconds."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            ask_health(uri, timeout=max(1.0, min(5.0, timeout)))
            return  # any HTTP answer means a server is there; MLflow reports what it thinks
        except requests.exceptions.SSLError as exc:  # a server is there: asking again cannot change its certificate
            raise TrackingError(f"{uri}: the TLS handshake with the tracking server failed ({tls_failure(exc)}); "
                                f"this URI came from {source}") from None
        except requests.RequestException as exc:
            if time.monotonic() >= deadline:
                raise TrackingError(f"{uri}: tracking server not reachable ({type(exc).__name__}); "
                                    f"this URI came from {source}") from None
        time.sleep(0.5)


def open_experiment(client: Any, settings: TrackingSettings) -> str:
    """The id of the experiment ``settings.experiment_name``, created when missing; a deleted one is an error."""
    from mlflow.exceptions import MlflowException

    name = settings.experiment_name
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)  # created meanwhile
    except PlantmlError:
        raise
    except Exception as exc:
        raise TrackingError(f"{settings.tracking_uri}: cannot open experiment {name!r}: {one_line(exc)}") from exc
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"{settings.tracking_uri}: experiment {name!r} is deleted; restore it or choose another name")
    return experiment.experiment_id


def check_artifact_access(client: Any, experiment_id: str, settings: TrackingSettings) -> None:
    """A one-line :class:`ConfigError` when the experiment keeps its artifacts in S3 and this client has no keys.

    A server started with ``--default-artifact-root s3://…`` (plantml's ``--artifacts direct``)
    leaves every upload to its clients: without keys, a training would run to its end and then
    fail to store its model. Keys count from the settings (environment, ``.env``) or boto3's
    files and profiles; cloud metadata services are not asked (no request leaves this machine).
    """
    location = str(client.get_experiment(experiment_id).artifact_location or "")
    if location.startswith("mlflow-artifacts:"):
        check_artifact_proxy(settings, location)
        return
    if not location.startswith("s3://"):
        return
    if (settings.aws_access_key and settings.aws_secret_key) or aws_keys_in_files():
        check_object_store_keys(settings, location)
        return
    raise ConfigError(
        f"experiment {settings.experiment_name!r} keeps its artifacts at {location} and its server does not store them "
        "for its clients: this client needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and MLFLOW_S3_ENDPOINT_URL for "
        "a store other than AWS) in the environment or .env, and found none")


#: What an object store answers for keys it does not know or a secret that does not match, and for a bucket that is
#: not there: every upload would be refused so. ``AccessDenied`` is not among them: write-only keys may list nothing.
REFUSED_KEYS = ("SignatureDoesNotMatch", "InvalidAccessKeyId")


def check_object_store_keys(settings: TrackingSettings, location: str) -> None:
    """A one-line :class:`ConfigError` when the object store at ``MLFLOW_S3_ENDPOINT_URL`` refuses this client's
    keys, has no bucket for ``location``, or shows a certificate this client refuses: every upload would fail so,
    retried until the run's end, hours of training later.

    One listing of at most one key under ``location``, checked as MLflow's S3 client checks (``AWS_CA_BUNDLE``,
    ``MLFLOW_S3_IGNORE_TLS``); any other answer, an outage included, is left to the sender. Without an endpoint
    (AWS itself) nothing is asked: no request leaves this machine.
    """
    endpoint = settings.s3_endpoint
    if not endpoint:
        return
    from botocore.exceptions import BotoCoreError, ClientError, SSLError

    from plantml.stack.endpoints import make_s3_client, s3_foreign_answer, s3_tls_hint

    parts = urlsplit(location)
    client = make_s3_client(endpoint, settings.aws_access_key, settings.aws_secret_key,
                            session_token=settings.aws_session_token, retries={"max_attempts": 1},
                            connect_timeout=3, read_timeout=10)
    try:
        client.list_objects_v2(Bucket=parts.netloc, Prefix=parts.path.lstrip("/"), MaxKeys=1)
    except SSLError as exc:
        raise ConfigError(f"object store {endpoint} (artifacts at {location}): the TLS handshake failed "
                          f"({tls_reason(exc)}){s3_tls_hint(exc)}") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in REFUSED_KEYS:
            raise ConfigError(f"object store {endpoint} (artifacts at {location}) refuses this client's keys ({code}: "
                              f"AWS_ACCESS_KEY_ID {settings.aws_access_key or '(from boto3 files)'!r}, from "
                              f"{settings.source_of('aws_access_key')}): every upload would fail") from None
        if code == "NoSuchBucket":
            raise ConfigError(f"object store {endpoint} has no bucket {parts.netloc!r} for the artifacts at {location}: "
                              "every upload would fail") from None
        if foreign := s3_foreign_answer(exc, endpoint):
            raise ConfigError(f"artifacts at {location}: {foreign}; every upload would fail") from None
    except BotoCoreError:
        return


def check_artifact_proxy(settings: TrackingSettings, location: str) -> None:
    """A one-line :class:`ConfigError` when the experiment's artifacts go through a server that serves none.

    An experiment created on a server started with ``--serve-artifacts`` (plantml's ``--artifacts
    proxied``) keeps ``mlflow-artifacts:/`` locations; the same database served by a server started
    ``--no-serve-artifacts`` (``--artifacts direct`` on that data folder) answers 503 to every upload,
    which a training would only find at its end, after retrying for minutes.
    """
    uri = settings.tracking_uri
    if serves_no_artifacts(uri):
        raise ConfigError(
            f"experiment {settings.experiment_name!r} keeps its artifacts at {location}, through its server, and "
            f"{mask_passwords(uri)} serves no artifacts (started with --no-serve-artifacts: a plantml stack started "
            "--artifacts direct on a data folder first started proxied); start that stack with --artifacts proxied, "
            "or use another experiment name")


def serves_no_artifacts(uri: str) -> bool:
    """True when the tracking server at ``uri`` answers 503 to an artifact listing: started ``--no-serve-artifacts``,
    it cannot store or serve the files of ``mlflow-artifacts:/`` locations. False for an outage, or no server."""
    if not uri.startswith(("http://", "https://")):
        return False
    import requests

    try:
        with ServerSession(uri) as session:  # the user and TLS settings the sender uses
            answer = session.get(f"{uri.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts", params={"path": ""}, timeout=10)
    except requests.RequestException:
        return False  # an outage is the sender's business: it retries
    return answer.status_code == 503


def aws_keys_in_files() -> bool:
    """True when boto3 finds keys without asking a metadata service (its config files, a profile, SSO…)."""
    import botocore.session

    resolver = botocore.session.get_session().get_component("credential_provider")
    for network_provider in ("container-role", "iam-role"):
        resolver.remove(network_provider)
    try:
        return resolver.load_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken profile is no usable key either
        return False
