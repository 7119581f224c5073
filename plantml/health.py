"""How plantml's own requests reach a tracking server: as MLflow's client does, and ``/health`` asked in one place.

MLflow's client reads the server's credentials and TLS settings from the environment
(``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``TOKEN``, ``MLFLOW_TRACKING_SERVER_CERT_PATH`` for a private CA,
``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_CLIENT_CERT_PATH``); plantml's requests of its own (the
tracker's deliveries, every first contact: a tracker's start, ``verify``, each registry call, an external stack,
the local stack's readiness) take them from the same place, so a server MLflow reaches, plantml reaches too.
"""

from __future__ import annotations

import re
from typing import Any

import requests

from plantml.errors import ConfigError


def host_creds(uri: str) -> Any:
    """MLflow's ``MlflowHostCreds`` for ``uri`` from the environment; settings it refuses are one :class:`ConfigError`."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds

    try:
        return get_default_host_creds(uri)
    except MlflowException as exc:  # MLFLOW_TRACKING_INSECURE_TLS=true beside MLFLOW_TRACKING_SERVER_CERT_PATH
        raise ConfigError(f"{uri}: MLflow's TLS settings disagree: {exc.message.splitlines()[0]}") from None


def tls_options(uri: str, creds: Any) -> dict[str, Any]:
    """``requests`` options that check an https server's certificate as MLflow does (nothing for http), to give
    each request: they win over ``REQUESTS_CA_BUNDLE``, as in MLflow's own requests. ``creds``: :func:`host_creds`
    of ``uri``."""
    if not uri.startswith("https://"):
        return {}
    return {"verify": creds.verify, "cert": creds.client_cert_path}


class ServerSession(requests.Session):
    """A session that authenticates to one server and checks its certificate as MLflow's client does.

    The certificate options go with every request: ``requests`` lets ``REQUESTS_CA_BUNDLE`` (set on many machines)
    override a session's own ``verify``, which would refuse a private CA that MLflow accepts.
    """

    def __init__(self, uri: str) -> None:
        super().__init__()
        creds = host_creds(uri)
        if creds.username and creds.password:
            self.auth = (creds.username, creds.password)
        elif creds.token:
            self.headers["Authorization"] = f"Bearer {creds.token}"
        self._tls = tls_options(uri, creds)

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        for name, value in self._tls.items():
            kwargs.setdefault(name, value)
        return super().request(method, url, *args, **kwargs)


def health_url(uri: str) -> str:
    """``<uri>/health``."""
    return f"{uri.rstrip('/')}/health"


def ask_health(uri: str, timeout: float | tuple[float, float]) -> requests.Response:
    """GET ``<uri>/health`` within ``timeout``, with the credentials MLflow's client sends (MLflow's own server asks
    none there, but a gateway in front of it, a token or basic-auth proxy, guards every path); ``requests``'
    exceptions as they come (an :class:`~requests.exceptions.SSLError`: a server answered, its certificate refused)."""
    with ServerSession(uri) as session:
        return session.get(health_url(uri), timeout=timeout)


def refusal_hint(uri: str, status: int) -> str:
    """For a 401 or 403 from ``uri``: which of MLflow's credential settings were refused, or that none were sent
    (else "")."""
    if status not in (401, 403):
        return ""
    creds = host_creds(uri)
    if creds.username and creds.password:
        return "; MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD were refused"
    if creds.token:
        return "; MLFLOW_TRACKING_TOKEN was refused"
    return "; no credentials were sent: set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and PASSWORD, as for MLflow"


#: What gets past a tracking server's certificate that this client refuses.
TRACKING_CA_HINT = "a server on a private CA: set MLFLOW_TRACKING_SERVER_CERT_PATH to that CA's certificate, as for MLflow itself"


def certificate_refused(exc: BaseException) -> bool:
    """Whether a TLS failure (requests' or botocore's) is a server certificate this client does not trust."""
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def tls_reason(exc: Exception) -> str:
    """OpenSSL's reason for a TLS failure (``[SSL: CERTIFICATE_VERIFY_FAILED] …``), from requests' or botocore's error."""
    found = re.search(r"\[SSL[^\]]*\][^'\"()]*", str(exc))
    return found[0].strip() if found else "TLS error"


def tls_failure(exc: Exception) -> str:
    """A TLS failure with a tracking server in a few words: OpenSSL's reason and what gets past it."""
    reason = tls_reason(exc)
    if certificate_refused(exc):
        return f"{reason}; {TRACKING_CA_HINT}"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason:
        return f"{reason}; is the server serving https?"
    return reason
