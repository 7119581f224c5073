"""plantml's dealings with the Docker daemon itself: a client, the network mode, the images, testcontainers' reaper,
and the labels that tie each container to the process that started it, by which :func:`prune_containers` removes
those whose owner is gone (``plantml stack prune``, and each start of a containers stack)."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Literal

from plantml.errors import StackError
from plantml.processes import process_start_time
from plantml.stack.images import BUILD_HINT

if TYPE_CHECKING:
    from docker import DockerClient

log = logging.getLogger(__name__)

NetworkMode = Literal["auto", "host", "bridge"]
NETWORK_MODES: tuple[NetworkMode, ...] = ("auto", "host", "bridge")

LABEL = "plantml.stack"
LABEL_PID = "plantml.pid"
LABEL_PID_START = "plantml.pid-start"
LABEL_HOST = "plantml.host"


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


def resolve_network(mode: NetworkMode, client: DockerClient) -> Literal["host", "bridge"]:
    """``auto``: a bridge where Docker has its default one, the host network otherwise (``--bridge=none``)."""
    if mode != "auto":
        return mode
    bridges = client.networks.list(names=["bridge"])
    return "bridge" if any(net.attrs.get("Driver") == "bridge" for net in bridges) else "host"


def check_image(client: DockerClient, service: str, image: str) -> None:
    """Raise :class:`StackError` telling how to build the image when it is not present locally."""
    from docker.errors import ImageNotFound

    try:
        client.images.get(image)
    except ImageNotFound:
        raise StackError(service, f"image {image!r} is not present locally: {BUILD_HINT}, or set "
                                  f"PLANTML_{service.upper()}_IMAGE (pytest: --{service}-image) to one that is") from None


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


def remove_containers(client: DockerClient, label: str, judge: Any = lambda labels: True) -> list[str]:
    """Remove the containers (then networks) carrying ``label`` that ``judge`` condemns; their names."""
    from docker.errors import APIError

    removed = []
    # ignore_removed: a container the killed stack's reaper removes between the listing and its inspection
    for container in client.containers.list(all=True, filters={"label": label}, ignore_removed=True):
        if judge(container.labels):
            try:
                container.remove(force=True, v=True)
                removed.append(container.name)
            except APIError:  # removed meanwhile (by the stack itself, or its reaper)
                pass
    for network in client.networks.list(filters={"label": label}):
        if judge(network.attrs.get("Labels") or {}):
            try:
                network.remove()
            except APIError:  # still in use by a live stack's container
                log.debug("network %s kept", network.name)
    return removed


def prune_containers(everything: bool = False, client: DockerClient | None = None) -> list[str]:
    """Remove plantml containers (and networks) whose owning process is gone, or all of them."""
    return remove_containers(client or docker_client(), LABEL, (lambda labels: True) if everything else owner_is_gone)
