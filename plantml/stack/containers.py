"""The containers backend: the stack as Docker containers, driven by testcontainers.

The same :class:`Stack` object as the local backend, built from the same service
descriptions (:mod:`plantml.stack.services`) and the same readiness checks (a real
PostgreSQL login, the bucket answering the stack's credentials, MLflow's ``/health``).

Networking: where Docker has its default ``bridge`` network, containers publish their
ports on 127.0.0.1 only and reach each other on a network of their own. Where it has
none (``dockerd --bridge=none``), containers share the host's network and every
service listens on 127.0.0.1 on a free port chosen here, like the local backend. No
traffic leaves loopback either way from the tests' side.

Cleanup: a failed start removes every container it made, with the failing
container's log in the error. Every container carries the ``plantml.*`` labels of its
owning process, so :func:`prune_containers` (``plantml stack prune``, also run at
each start) removes those whose owner is gone even when testcontainers' Ryuk reaper
is unavailable (its image needs a registry; it is turned off when absent).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from plantml.errors import ConfigError, StackError
from plantml.settings import env_value
from plantml.stack.base import ManagedStack
from plantml.stack.endpoints import ArtifactMode, make_s3_client, object_store_serves
from plantml.stack.images import BUILD_HINT, REGISTRY_IMAGES, default_mlflow_image, default_postgres_image, default_seaweedfs_image
from plantml.stack.local import LOG_TAIL_LINES, free_port
from plantml.stack.services import (
    LOOPBACK,
    SEAWEED_EXTRA_PORTS,
    SERVICE_NAMES,
    MLflowServerSpec,
    PostgresSpec,
    S3Spec,
    StackSpec,
    seaweed_mini_args,
)

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container
    from testcontainers.core.container import DockerContainer

log = logging.getLogger(__name__)

S3Flavour = Literal["seaweedfs", "minio"]
S3_FLAVOURS: tuple[S3Flavour, ...] = ("seaweedfs", "minio")
NetworkMode = Literal["auto", "host", "bridge"]
NETWORK_MODES: tuple[NetworkMode, ...] = ("auto", "host", "bridge")

LABEL = "plantml.stack"
LABEL_PID = "plantml.pid"
LABEL_PID_START = "plantml.pid-start"
LABEL_HOST = "plantml.host"


# -- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContainerSettings:
    """Images, object-store flavour and network mode of the containers backend.

    Resolved once by :meth:`from_env`: an explicit value, else ``PLANTML_POSTGRES_IMAGE``,
    ``PLANTML_S3_IMAGE``, ``PLANTML_MLFLOW_IMAGE``, ``PLANTML_S3_FLAVOUR`` and
    ``PLANTML_CONTAINER_NETWORK``, else the images ``plantml stack build-images`` makes.
    """

    postgres_image: str
    s3_image: str
    mlflow_image: str
    s3_flavour: S3Flavour = "seaweedfs"
    network: NetworkMode = "auto"

    @classmethod
    def from_env(cls, postgres_image: str | None = None, s3_image: str | None = None, mlflow_image: str | None = None,
                 s3_flavour: str | None = None, network: str | None = None) -> ContainerSettings:
        """Explicit values first, then the environment, then the defaults."""
        flavour = env_value("PLANTML_S3_FLAVOUR", s3_flavour)
        if flavour not in S3_FLAVOURS:
            raise ConfigError(f"S3 flavour {flavour!r}: expected one of {', '.join(S3_FLAVOURS)}")
        mode = env_value("PLANTML_CONTAINER_NETWORK", network)
        if mode not in NETWORK_MODES:
            raise ConfigError(f"container network {mode!r}: expected one of {', '.join(NETWORK_MODES)}")
        default_s3 = default_seaweedfs_image() if flavour == "seaweedfs" else REGISTRY_IMAGES["minio"]
        return cls(
            postgres_image=env_value("PLANTML_POSTGRES_IMAGE", postgres_image) or default_postgres_image(),
            s3_image=env_value("PLANTML_S3_IMAGE", s3_image) or default_s3,
            mlflow_image=env_value("PLANTML_MLFLOW_IMAGE", mlflow_image) or default_mlflow_image(),
            s3_flavour=flavour,  # type: ignore[arg-type]
            network=mode,  # type: ignore[arg-type]
        )

    def image_of(self, service: str) -> str:
        """The image of ``postgres``, ``s3`` or ``mlflow``."""
        return {"postgres": self.postgres_image, "s3": self.s3_image, "mlflow": self.mlflow_image}[service]


# -- docker helpers ---------------------------------------------------------------------------------

def docker_client() -> DockerClient:
    """A docker-py client from the environment, or :class:`StackError` when no daemon answers."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except DockerException as exc:
        raise StackError("docker", f"no Docker daemon answers ({exc})") from None
    return client


def has_bridge_network(client: DockerClient) -> bool:
    """True when Docker's default ``bridge`` network exists (not with ``dockerd --bridge=none``)."""
    return any(net.name == "bridge" and net.attrs.get("Driver") == "bridge" for net in client.networks.list(names=["bridge"]))


def resolve_network(mode: NetworkMode, client: DockerClient) -> Literal["host", "bridge"]:
    """``auto``: published ports on a bridge where Docker has one, the host network otherwise."""
    if mode == "auto":
        return "bridge" if has_bridge_network(client) else "host"
    return mode


def check_image(client: DockerClient, service: str, image: str) -> None:
    """Raise :class:`StackError` telling how to build the image when it is not present locally."""
    from docker.errors import ImageNotFound

    try:
        client.images.get(image)
    except ImageNotFound:
        raise StackError(service, f"image {image!r} is not present locally: {BUILD_HINT}") from None


def configure_reaper(client: DockerClient) -> None:
    """Turn testcontainers' Ryuk reaper off when its image is absent (it would need a registry)."""
    from docker.errors import ImageNotFound
    from testcontainers.core.config import testcontainers_config

    if testcontainers_config.ryuk_disabled:
        return
    try:
        client.images.get(testcontainers_config.ryuk_image)
    except ImageNotFound:
        log.info("Ryuk image %s absent: reaper off, plantml removes its own containers", testcontainers_config.ryuk_image)
        testcontainers_config.ryuk_disabled = True


def process_start_time(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), None when it does not exist.

    With the pid it identifies one process even after the pid is reused.
    """
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_labels(stack_id: str) -> dict[str, str]:
    """The labels that tie a container to this process (see :func:`prune_containers`)."""
    pid = os.getpid()
    return {LABEL: stack_id, LABEL_PID: str(pid), LABEL_PID_START: process_start_time(pid) or "",
            LABEL_HOST: socket.gethostname()}


def owner_is_gone(labels: dict[str, str]) -> bool:
    """True when the process that started a container on this host no longer runs."""
    if labels.get(LABEL_HOST) != socket.gethostname():
        return False  # another machine's container (a shared daemon): not ours to judge
    try:
        pid = int(labels.get(LABEL_PID, ""))
    except ValueError:
        return True
    return process_start_time(pid) != labels.get(LABEL_PID_START)


def prune_containers(everything: bool = False, client: DockerClient | None = None) -> list[str]:
    """Remove plantml containers (and networks) whose owning process is gone, or all of them.

    Returns the names of the containers removed.
    """
    client = client or docker_client()
    removed = []
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        if everything or owner_is_gone(container.labels):
            container.remove(force=True, v=True)
            removed.append(container.name)
    for network in client.networks.list(filters={"label": LABEL}):
        if everything or owner_is_gone(network.attrs.get("Labels") or {}):
            try:
                network.remove()
            except Exception:  # noqa: BLE001 - still in use by a live stack's container
                log.debug("network %s kept", network.name)
    return removed


def container_log_tail(container: Container | None, lines: int | None = LOG_TAIL_LINES) -> str:
    """The last lines of a container's output (all of it for None; '' when there is none or it is gone)."""
    if container is None:
        return ""
    try:
        return container.logs(tail=lines or "all").decode(errors="replace").rstrip()
    except Exception:  # noqa: BLE001 - a log is a courtesy: never hide the real error behind it
        return ""


# -- one class per service ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where a service listens (inside its container) and where the host reaches it."""

    network: Literal["host", "bridge"]
    host_port: int  # on 127.0.0.1
    container_port: int  # equal to host_port on the host network
    alias: str  # how other containers reach it: 127.0.0.1 on the host network, the container's name on a bridge

    @property
    def listen(self) -> str:
        """The address to bind in the container: loopback shared with the host, or every interface."""
        return LOOPBACK if self.network == "host" else "0.0.0.0"  # noqa: S104 - the container's own interface

    def inner_url(self, scheme: str = "http") -> str:
        """The URL another container of the stack uses."""
        return f"{scheme}://{self.alias}:{self.container_port}"


class ContainerService:
    """One service as a container: its command and environment (from the service spec), a readiness probe."""

    name: ClassVar[str]
    bridge_port: ClassVar[int]  # the service's usual port inside its container on a bridge
    start_timeout: ClassVar[float] = 60
    stop_signal: ClassVar[str] = "SIGTERM"

    def __init__(self, image: str, placement: Placement, labels: dict[str, str], container_name: str,
                 network_name: str | None = None) -> None:
        self.image = image
        self.placement = placement
        self.port = placement.host_port
        self.labels = labels
        self.container_name = container_name
        self.network_name = network_name
        self.container: DockerContainer | None = None

    # -- what subclasses describe ----------------------------------------------------------
    def command(self) -> list[str]:
        """The container's command (after the image's entrypoint)."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """The container's environment."""
        return {}

    def ready(self) -> bool:
        """True once the service answers from the host (a real request, not a TCP accept)."""
        raise NotImplementedError

    def after_start(self) -> None:
        """Work once the service answers (create the database, the bucket)."""

    # -- lifecycle ----------------------------------------------------------------------------
    def make_container(self) -> DockerContainer:
        """The testcontainers description of this container."""
        from testcontainers.core.container import DockerContainer

        kwargs: dict[str, Any] = {"labels": self.labels, "stop_signal": self.stop_signal}
        # Always an explicit network: testcontainers would otherwise guess one (docker-in-docker).
        # On a user network containers reach each other by name.
        kwargs["network"] = "host" if self.placement.network == "host" else self.network_name
        container = DockerContainer(self.image, command=self.command(), env=self.env(), name=self.container_name)
        container.with_kwargs(**kwargs)
        if self.placement.network == "bridge":  # published on loopback only
            container.ports = {f"{self.placement.container_port}/tcp": (LOOPBACK, self.placement.host_port)}  # type: ignore[dict-item]
        return container

    @property
    def docker_container(self) -> Container | None:
        """The docker-py container, once created."""
        return self.container._container if self.container is not None else None  # noqa: SLF001

    @property
    def running(self) -> bool:
        """True while the container runs."""
        container = self.docker_container
        if container is None:
            return False
        try:
            container.reload()
        except Exception:  # noqa: BLE001 - removed behind our back: not running
            return False
        return container.status == "running"

    def log_tail(self) -> str:
        """The last lines of the container's log."""
        return container_log_tail(self.docker_container)

    def start(self) -> None:
        """Create and start the container (or start it again) and wait until it answers."""
        self.launch()
        self.wait()

    def launch(self) -> None:
        """Create and start the container (or start the stopped one again) without waiting."""
        from docker.errors import APIError

        try:
            if self.container is None:
                self.container = self.make_container()
                self.container.start()
            else:
                self.docker_container.start()  # type: ignore[union-attr]
        except APIError as exc:
            raise StackError(self.name, f"container could not be started: {exc.explanation or exc}", self.log_tail()) from None

    def wait(self) -> None:
        """Wait until the launched service answers, then do its after-start work."""
        self.wait_until_ready()
        self.after_start()

    def wait_until_ready(self) -> None:
        """Poll the readiness probe; a container that exits or a timeout raises with its log."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.ready():
                return
            container = self.docker_container
            if container is not None:
                container.reload()
                if container.status in ("exited", "dead"):
                    code = container.attrs.get("State", {}).get("ExitCode")
                    raise StackError(self.name, f"container exited with code {code} while starting", self.log_tail())
            if time.monotonic() > deadline:
                raise StackError(self.name, f"not ready after {self.start_timeout:.0f} s", self.log_tail())
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the container, keeping it (and its data) for :meth:`start`."""
        container = self.docker_container
        if container is not None:
            container.stop(timeout=10)

    def remove(self) -> None:
        """Remove the container and its anonymous volumes."""
        if self.container is not None:
            try:
                self.container.stop()  # testcontainers: force-remove
            except Exception:  # noqa: BLE001 - teardown goes on whatever happened
                log.warning("%s: removing the container failed", self.name, exc_info=True)
            self.container = None


class PostgresContainer(ContainerService):
    """PostgreSQL 15 (the official image's contract: ``POSTGRES_*`` variables, ``postgres ARGS``)."""

    name = "postgres"
    bridge_port = 5432
    start_timeout = 60
    stop_signal = "SIGINT"  # "fast" shutdown: do not wait for MLflow's connections to leave

    def __init__(self, *args: Any, spec: PostgresSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec

    def command(self) -> list[str]:
        return ["postgres", "-p", str(self.placement.container_port), "-c", f"listen_addresses={self.placement.listen}",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]

    def env(self) -> dict[str, str]:
        return {"POSTGRES_USER": self.spec.user, "POSTGRES_PASSWORD": self.spec.password, "POSTGRES_DB": self.spec.database}

    def _connect(self, dbname: str) -> Any:
        import psycopg2

        return psycopg2.connect(host=LOOPBACK, port=self.port, user=self.spec.user, password=self.spec.password,
                                dbname=dbname, connect_timeout=2)

    def ready(self) -> bool:
        import psycopg2

        try:
            self._connect("postgres").close()
        except psycopg2.OperationalError:
            return False
        return True

    def after_start(self) -> None:
        conn = self._connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.spec.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.spec.database}" OWNER "{self.spec.user}"')
        finally:
            conn.close()

    def backend_uri(self) -> str:
        """The URI the MLflow container uses."""
        return self.spec.sqlalchemy_uri(self.placement.alias, self.placement.container_port)


class S3Container(ContainerService):
    """The object store: ready when the bucket answers to the stack's credentials."""

    name = "s3"

    def __init__(self, *args: Any, spec: S3Spec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self._client = make_s3_client(f"http://{LOOPBACK}:{self.port}", spec.access_key, spec.secret_key,
                                      connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})

    def ready(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.spec.bucket)
        except ClientError as exc:
            return self._missing_bucket(exc)
        except BotoCoreError:
            return False
        return object_store_serves(self._client, self.spec.bucket)

    def _missing_bucket(self, exc: Exception) -> bool:
        """Whether a head_bucket error means "answering, bucket absent" and the bucket could be made."""
        return False


class SeaweedContainer(S3Container):
    """SeaweedFS ``weed mini``, creating the bucket itself; every port chosen (host network)."""

    bridge_port = 8333
    start_timeout = 45

    def __init__(self, *args: Any, extra_ports: dict[str, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_ports = extra_ports

    def command(self) -> list[str]:
        if self.placement.network == "host":
            args = seaweed_mini_args("/data", self.spec.bucket, self.placement.container_port, self.extra_ports)
        else:  # its own network namespace: default extra ports, reachable as "s3"
            args = seaweed_mini_args("/data", self.spec.bucket, self.placement.container_port, {},
                                     ip=self.placement.alias, bind="0.0.0.0")  # noqa: S104
        return ["weed", *args]

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.spec.access_key, "AWS_SECRET_ACCESS_KEY": self.spec.secret_key}


class MinioContainer(S3Container):
    """MinIO (``minio/minio``): the stack's keys as root credentials; the bucket is created here."""

    bridge_port = 9000
    start_timeout = 60

    def __init__(self, *args: Any, console_port: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.console_port = console_port

    def command(self) -> list[str]:
        listen = self.placement.listen
        console = self.console_port if self.placement.network == "host" else 9001
        return ["server", "/data", "--address", f"{listen}:{self.placement.container_port}",
                "--console-address", f"{listen}:{console}"]

    def env(self) -> dict[str, str]:
        return {"MINIO_ROOT_USER": self.spec.access_key, "MINIO_ROOT_PASSWORD": self.spec.secret_key}

    def _missing_bucket(self, exc: Exception) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        if getattr(exc, "response", {}).get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            return False
        try:
            self._client.create_bucket(Bucket=self.spec.bucket)
        except (BotoCoreError, ClientError):
            return False
        return True


class MLflowContainer(ContainerService):
    """``mlflow server`` with the same arguments and environment as the local backend's."""

    name = "mlflow"
    bridge_port = 5000
    start_timeout = 90

    def __init__(self, *args: Any, spec: MLflowServerSpec, backend_uri: str, s3_endpoint: str, s3: S3Spec,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.backend_uri = backend_uri
        self.s3_endpoint = s3_endpoint
        self.s3 = s3

    def command(self) -> list[str]:
        return ["mlflow", "server", *self.spec.server_args(self.backend_uri, self.s3.bucket, self.placement.listen,
                                                            self.placement.container_port)]

    def env(self) -> dict[str, str]:
        return self.spec.server_env(self.s3_endpoint, self.s3)

    def ready(self) -> bool:
        import requests

        try:
            return requests.get(f"http://{LOOPBACK}:{self.port}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False


# -- the stack -------------------------------------------------------------------------------------------

class ContainersStack(ManagedStack):
    """The tracking stack as three containers, with fresh random credentials and free loopback ports.

    :meth:`stop` removes every container (and the stack's network on a bridge).
    """

    backend = "containers"

    def __init__(self, artifact_mode: ArtifactMode = "direct", *, spec: StackSpec | None = None,
                 settings: ContainerSettings | None = None, **settings_overrides: str | None) -> None:
        super().__init__(spec or StackSpec(mlflow=MLflowServerSpec(artifact_mode=artifact_mode)))
        self.settings = settings or ContainerSettings.from_env(**settings_overrides)
        self.stack_id = uuid.uuid4().hex[:10]
        self._network: Any = None
        self._client: DockerClient | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, service: str | None = None) -> ContainersStack:
        """Start the whole stack, or one stopped service.

        The three containers start at once: the MLflow server spends its first seconds
        importing, and it retries its database connection (MLflow's own engine retry)
        while PostgreSQL initialises. Readiness is then awaited in dependency order, so
        a failing PostgreSQL is reported as such, not as an MLflow failure.
        """
        if service is not None:
            self._service(service).start()
            return self
        if self.services:
            raise StackError("stack", "already started")
        atexit.register(self.stop)
        try:
            self._client = docker_client()
            prune_containers(client=self._client)  # what a killed session left behind
            for name in SERVICE_NAMES:
                check_image(self._client, name, self.settings.image_of(name))
            configure_reaper(self._client)
            self._build_services()
            with ThreadPoolExecutor(max_workers=len(SERVICE_NAMES), thread_name_prefix="plantml-container") as pool:
                for launched in [pool.submit(self.services[name].launch) for name in SERVICE_NAMES]:
                    launched.result()
                s3_ready = pool.submit(self.services["s3"].wait)
                self.services["postgres"].wait()
                s3_ready.result()
                self.services["mlflow"].wait()
        except BaseException:
            self.stop()
            raise
        self._endpoints = self._make_endpoints()
        log.info("stack ready: %r", self._endpoints)
        return self

    def stop(self, service: str | None = None) -> None:
        """Remove every container, or only stop ``service`` (kept, with its data, for :meth:`start`)."""
        if service is not None:
            self._service(service).stop()
            return
        for name in reversed(SERVICE_NAMES):
            if name in self.services:
                self.services[name].remove()
        self.services = {}
        if self._network is not None:
            try:
                self._network.remove()
            except Exception:  # noqa: BLE001
                log.warning("could not remove network %s", self._network.name, exc_info=True)
            self._network = None
        self._endpoints = None
        atexit.unregister(self.stop)

    def log_tails(self) -> dict[str, str]:
        """The last lines of each container's log."""
        return {name: svc.log_tail() for name, svc in self.services.items()}

    def service_logs(self) -> dict[str, str]:
        """Each container's whole log so far."""
        return {name: container_log_tail(svc.docker_container, lines=None) for name, svc in self.services.items()}

    # -- internals ------------------------------------------------------------------------------
    @staticmethod
    def _placement(mode: Literal["host", "bridge"], container_name: str, bridge_port: int, taken: set[int]) -> Placement:
        port = free_port(taken)
        if mode == "host":
            return Placement("host", port, port, LOOPBACK)
        return Placement("bridge", port, bridge_port, container_name)

    def _build_services(self) -> None:
        assert self._client is not None
        mode = resolve_network(self.settings.network, self._client)
        labels = owner_labels(self.stack_id)
        network_name = None
        if mode == "bridge":
            network_name = f"plantml-{self.stack_id}"
            self._network = self._client.networks.create(network_name, driver="bridge", labels=labels)
        taken: set[int] = set()

        def common(name: str, bridge_port: int) -> dict[str, Any]:
            container_name = f"plantml-{self.stack_id}-{name}"
            return {"placement": self._placement(mode, container_name, bridge_port, taken), "labels": labels,
                    "container_name": container_name, "network_name": network_name, "image": self.settings.image_of(name)}

        postgres = PostgresContainer(spec=self.spec.postgres, **common("postgres", PostgresContainer.bridge_port))
        s3: S3Container
        if self.settings.s3_flavour == "minio":
            s3 = MinioContainer(spec=self.spec.s3, console_port=free_port(taken), **common("s3", MinioContainer.bridge_port))
        else:
            extra = {flag: free_port(taken) for flag in SEAWEED_EXTRA_PORTS}
            s3 = SeaweedContainer(spec=self.spec.s3, extra_ports=extra, **common("s3", SeaweedContainer.bridge_port))
        mlflow = MLflowContainer(spec=self.spec.mlflow, backend_uri=postgres.backend_uri(), s3_endpoint=s3.placement.inner_url(),
                                 s3=self.spec.s3, **common("mlflow", MLflowContainer.bridge_port))
        self.services = {"postgres": postgres, "s3": s3, "mlflow": mlflow}



def start_containers_stack(artifact_mode: ArtifactMode = "direct", **kwargs: Any) -> ContainersStack:
    """Start a containers stack and return it (also a context manager that stops it)."""
    return ContainersStack(artifact_mode, **kwargs).start()


__all__ = [
    "ContainerSettings", "ContainersStack", "MLflowContainer", "MinioContainer", "PostgresContainer", "S3_FLAVOURS",
    "SeaweedContainer", "prune_containers", "start_containers_stack",
]
