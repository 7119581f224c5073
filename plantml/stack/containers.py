"""The containers runner: each service's description run as a Docker container (testcontainers).

A container runs the description's command (the image only provides the program), as
the same account as the host runner would use, with the service's folder mounted at
the same path, so the data of a stack is the same on both runners and survives its
containers. Where Docker has its default ``bridge`` network, containers publish their
client port on 127.0.0.1 only and reach each other by name; where it has none
(``dockerd --bridge=none``), they share the host's network and listen on 127.0.0.1.

Cleanup: every container carries the ``plantml.*`` labels of its owner process. A
reaper process (:mod:`plantml.stack.reaper`) removes them once the owner is gone, even
by ``kill -9`` (testcontainers' Ryuk needs a registry; it is turned off when absent),
and :func:`prune_containers` (``plantml stack prune``, also run at each start) removes
what a killed reaper left.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from plantml.errors import ConfigError, StackError
from plantml.settings import env_value
from plantml.stack.docker_api import (
    NETWORK_MODES,
    NetworkMode,
    check_image,
    configure_reaper,
    docker_client,
    owner_labels,
    prune_containers,
    resolve_network,
)
from plantml.stack.endpoints import ArtifactMode
from plantml.stack.files import write_private
from plantml.stack.images import REGISTRY_IMAGES, default_mlflow_image, default_postgres_image, default_seaweedfs_image
from plantml.stack.s3 import resolve_flavour
from plantml.stack.service import SERVICE_NAMES, Command, Network, ServiceSpec
from plantml.stack.stack import ManagedStack

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container
    from testcontainers.core.container import DockerContainer

log = logging.getLogger(__name__)

#: The container states of a live service: a paused container is hung, not gone.
ALIVE = ("running", "paused")
#: Docker's log of each container: at most two files of 32 MB (the local runner's cap, see ``HostProcess.trim_log``).
LOG_CONFIG = {"type": "json-file", "config": {"max-size": "32m", "max-file": "2"}}


@dataclass(frozen=True)
class ContainerSettings:
    """Images and network mode of the containers runner.

    Resolved once by :meth:`from_env`: an explicit value, else ``PLANTML_POSTGRES_IMAGE``,
    ``PLANTML_S3_IMAGE``, ``PLANTML_MLFLOW_IMAGE``, ``PLANTML_S3_FLAVOUR`` and
    ``PLANTML_CONTAINER_NETWORK``, else the images ``plantml stack build-images`` makes.
    """

    postgres_image: str
    s3_image: str
    mlflow_image: str
    s3_flavour: str = "seaweedfs"
    network: NetworkMode = "auto"

    @classmethod
    def from_env(cls, postgres_image: str | None = None, s3_image: str | None = None, mlflow_image: str | None = None,
                 s3_flavour: str | None = None, container_network: str | None = None) -> ContainerSettings:
        """Explicit values first, then the environment, then the defaults (argument names follow the variables')."""
        flavour = resolve_flavour(s3_flavour)
        mode = env_value("PLANTML_CONTAINER_NETWORK", container_network)
        if mode not in NETWORK_MODES:
            raise ConfigError(f"container network {mode!r}: expected one of {', '.join(NETWORK_MODES)}")
        default_s3 = default_seaweedfs_image() if flavour == "seaweedfs" else REGISTRY_IMAGES["minio"]
        return cls(
            postgres_image=env_value("PLANTML_POSTGRES_IMAGE", postgres_image) or default_postgres_image(),
            s3_image=env_value("PLANTML_S3_IMAGE", s3_image) or default_s3,
            mlflow_image=env_value("PLANTML_MLFLOW_IMAGE", mlflow_image) or default_mlflow_image(),
            s3_flavour=flavour, network=mode,  # type: ignore[arg-type]
        )

    def image_of(self, service: str) -> str:
        """The image of ``postgres``, ``s3`` or ``mlflow``."""
        return {"postgres": self.postgres_image, "s3": self.s3_image, "mlflow": self.mlflow_image}[service]


# -- a service as a container ----------------------------------------------------------------------

class ContainerProcess:
    """One service as a container: created at the first start, stopped and started again, removed at the end."""

    def __init__(self, spec: ServiceSpec, runner: ContainerRunner, on_spawn: Callable[[], None] = lambda: None) -> None:
        self.spec = spec
        self.runner = runner
        self.on_spawn = on_spawn
        self.container_name = runner.container_name(spec.name)
        self._container: DockerContainer | None = None

    @property
    def docker_container(self) -> Container | None:
        """The docker-py container, once created (None while :meth:`start` still creates it: the stack starts its
        services at once, and each one up records every service's pid)."""
        from testcontainers.core.exceptions import ContainerStartException

        if self._container is None:
            return None
        try:
            return self._container.get_wrapped_container()
        except ContainerStartException:  # described, not created yet
            return None

    @property
    def running(self) -> bool:
        """True while the container runs; a paused one too (hung, not dead, as a stopped local process is):
        it cannot be started again until unpaused; the supervisor's health check kills it (see :meth:`kill`)."""
        return self._state().get("Status") in ALIVE

    @property
    def pid(self) -> int | None:
        """Host pid of the container's main process while it runs."""
        state = self._state()
        return state.get("Pid") if state.get("Status") in ALIVE else None

    def _state(self) -> dict[str, Any]:
        container = self.docker_container
        if container is None:
            return {}
        try:
            container.reload()
        except Exception:  # noqa: BLE001 - removed behind our back: no state
            return {}
        return container.attrs.get("State", {})

    def start(self) -> None:
        """Create and start the container (or start the stopped one again) and wait until it answers."""
        from docker.errors import APIError, NotFound

        try:
            container = self.docker_container
            if container is None:  # never described, or a first creation that failed: described again below
                self._container = None
            else:
                try:
                    container.start()
                except NotFound:  # removed behind the stack's back (docker rm -f): made again, on the same folder
                    self._container = None
            if self._container is None:
                self._container = self.runner.describe(self.spec, self.container_name)
                self._container.start()
        except APIError as exc:
            raise StackError(self.spec.name, f"container could not be started: {exc.explanation or exc}", self.log_tail()) from None
        self.on_spawn()
        if not self._wait():
            raise StackError(self.spec.name, f"not ready after {self.spec.start_timeout:.0f} s", self.log_tail())

    def _wait(self) -> bool:
        @retry(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(self.spec.start_timeout), wait=wait_fixed(0.2),
               retry_error_callback=lambda state: False)
        def answers() -> bool:
            state = self._state()
            if state.get("Status") in ("exited", "dead"):
                raise self.spec.exited_while_starting(f"container exited with code {state.get('ExitCode')} while starting",
                                                      self.log_tail())
            return self.spec.ready()

        return answers()

    def stop(self) -> None:
        """Stop the container, keeping it (its folder stays anyway) for :meth:`start`."""
        container = self.docker_container
        if container is not None:
            container.stop(timeout=10)

    def kill(self) -> None:
        """Kill the container (unpaused first: Docker kills no paused container); it stays, stopped, for :meth:`start`."""
        from docker.errors import APIError

        container = self.docker_container
        if container is None:
            return
        try:
            if self._state().get("Status") == "paused":
                container.unpause()
            container.kill()
        except APIError as exc:  # exited or removed meanwhile: the supervisor sees it down either way
            log.warning("%s: killing the container failed: %s", self.spec.name, exc.explanation or exc)

    def remove(self, at_once: bool = False) -> None:
        """Remove the container (always at once: testcontainers force-removes it)."""
        from docker.errors import NotFound

        if self._container is not None:
            try:
                self._container.stop()  # testcontainers: force-remove
            except NotFound:  # already removed (docker rm -f): nothing left to do
                pass
            except Exception:  # noqa: BLE001 - teardown goes on whatever happened
                log.warning("%s: removing the container failed", self.spec.name, exc_info=True)
            self._container = None

    def trim_log(self) -> None:
        """Nothing to do: Docker keeps the container's log under :data:`LOG_CONFIG`'s cap."""

    def log_tail(self, lines: int | None = 25) -> str:
        """The last lines of the container's output ('' when there is none)."""
        container = self.docker_container
        try:
            return container.logs(tail=lines or "all").decode(errors="replace").rstrip() if container else ""
        except Exception:  # noqa: BLE001 - a log is a courtesy: never hide the real error behind it
            return ""


class ContainerRunner:
    """Runs a stack's services as containers of the images in :class:`ContainerSettings`."""

    backend = "containers"

    def __init__(self, settings: ContainerSettings) -> None:
        self.settings = settings
        self.network = Network()
        self.stack_id = ""
        self._client: DockerClient | None = None
        self._mode: Literal["host", "bridge"] = "host"
        self._docker_network: Any = None
        self._reaper: subprocess.Popen[bytes] | None = None

    def container_name(self, service: str) -> str:
        """The name of a service's container."""
        return f"plantml-{self.stack_id}-{service}"

    def open(self, stack_id: str, folder: Path) -> None:
        """Check Docker and the images, prune dead stacks' containers, start the reaper, make the network."""
        self.stack_id = stack_id
        self._client = docker_client()
        prune_containers(client=self._client)
        for name in SERVICE_NAMES:
            check_image(self._client, name, self.settings.image_of(name))
        configure_reaper(self._client)
        # Started before any container: once this process is gone, it removes every container of the stack.
        self._reaper = subprocess.Popen([sys.executable, "-m", "plantml.stack.reaper", stack_id], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, start_new_session=True)
        self._mode = resolve_network(self.settings.network, self._client)
        if self._mode == "bridge":
            name = f"plantml-{stack_id}"
            self._docker_network = self._client.networks.create(name, driver="bridge", labels=owner_labels(stack_id))
            self.network = Network(bind="0.0.0.0", hosts={s: self.container_name(s) for s in SERVICE_NAMES})  # noqa: S104

    def describe(self, spec: ServiceSpec, name: str, one_off: Command | None = None) -> DockerContainer:
        """The testcontainers description of a service's container (or of a one-off command, with no network)."""
        from testcontainers.core.container import DockerContainer

        command = one_off or spec.command
        account = spec.account
        passwd = spec.folder / ".passwd"  # initdb looks its own account up: the container learns the host's
        write_private(passwd, account.passwd_line(), None if account.uid == os.geteuid() else (account.uid, account.gid))
        container = DockerContainer(self.settings.image_of(spec.name), command=list(command[1:]),  # type: ignore[arg-type]
                                    env={**spec.env, "HOME": str(spec.folder)}, name=name)
        container.with_volume_mapping(spec.folder, str(spec.folder), "rw")
        container.with_volume_mapping(passwd, "/etc/passwd", "ro")
        if one_off:
            network: dict[str, str] = {"network_mode": "none"}
        else:
            network = {"network_mode": "host"} if self._mode == "host" else {"network": self._docker_network.name}
        container.with_kwargs(entrypoint=[command[0]], user=f"{account.uid}:{account.gid}", working_dir=str(spec.folder),
                              labels=owner_labels(self.stack_id), stop_signal=spec.stop_signal.name,
                              log_config=LOG_CONFIG, **network)
        if self._mode == "bridge" and not one_off:  # only the client port, on loopback only
            container.ports[f"{spec.port}/tcp"] = ("127.0.0.1", spec.port)  # type: ignore[assignment]
        return container

    def process(self, spec: ServiceSpec, on_spawn: Callable[[], None] = lambda: None) -> ContainerProcess:
        """A (not yet created) container for ``spec``."""
        return ContainerProcess(spec, self, on_spawn)

    def run_once(self, spec: ServiceSpec, command: Command) -> None:
        """Run ``command`` to its end in a throwaway container of the service's image (no network)."""
        container = self.describe(spec, f"{self.container_name(spec.name)}-init", one_off=command)
        container.start()
        try:
            code = container.get_wrapped_container().wait(timeout=120).get("StatusCode")
            if code != 0:
                output = container.get_wrapped_container().logs().decode(errors="replace")
                raise StackError(spec.name, f"{command[0]} failed with exit code {code}", output[-2000:])
        finally:
            container.stop()  # testcontainers: force-remove

    def close(self) -> None:
        """Remove the network, then let the reaper go (it removes whatever is left, then exits)."""
        if self._docker_network is not None:
            try:
                self._docker_network.remove()
            except Exception:  # noqa: BLE001 - the reaper and prune try again
                log.warning("could not remove network %s", self._docker_network.name, exc_info=True)
            self._docker_network = None
        if self._reaper is not None:
            self._reaper.stdin.close()  # type: ignore[union-attr]
            self._reaper.wait(timeout=60)
            self._reaper = None

    def log_hint(self, processes: Mapping[str, Any]) -> str:
        """The ``docker logs`` names."""
        return "docker logs NAME, NAME in: " + " ".join(self.container_name(name) for name in processes)


class ContainersStack(ManagedStack):
    """The tracking stack as containers (see :class:`ManagedStack` for the options; images in ``settings``)."""

    backend = "containers"

    def __init__(self, artifact_mode: ArtifactMode = "direct", *, settings: ContainerSettings | None = None,
                 images: Mapping[str, str | None] | None = None, s3_flavour: str | None = None, **options: Any) -> None:
        self.settings = settings or ContainerSettings.from_env(s3_flavour=s3_flavour, **(images or {}))
        super().__init__(ContainerRunner(self.settings), artifact_mode, s3_flavour=self.settings.s3_flavour, **options)


def start_containers_stack(artifact_mode: ArtifactMode = "direct", **options: Any) -> ContainersStack:
    """Start a containers stack and return it (also a context manager that stops it)."""
    return ContainersStack(artifact_mode, **options).start()


__all__ = ["ContainerRunner", "ContainerSettings", "ContainersStack", "start_containers_stack"]
