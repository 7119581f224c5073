"""A service's container as the supervisor sees it, against a fake of docker-py's container (no daemon)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import requests
from docker.errors import NotFound
from testcontainers.core.exceptions import ContainerStartException

from plantml.stack.containers import ContainerProcess


class FakeContainer:
    """docker-py's container, as far as :class:`ContainerProcess` reads it; ``status`` None: removed behind its back."""

    def __init__(self, status: str | None = "running") -> None:
        self.status = status
        self.attrs: dict = {}

    def reload(self) -> None:
        if self.status is None:
            raise NotFound("No such container", response=requests.Response())
        self.attrs = {"State": {"Status": self.status, "Pid": 4242}}

    def get_wrapped_container(self) -> FakeContainer:  # testcontainers' wrapper and docker-py's container in one
        return self

    def unpause(self) -> None:
        assert self.status == "paused"
        self.status = "running"

    def kill(self) -> None:
        if self.status == "paused":  # a frozen cgroup takes no signal until it thaws
            raise AssertionError("killed while paused")
        self.status = "exited"

    def stop(self) -> None:  # testcontainers' stop: a forced removal
        self.reload()
        self.status = None


def process_of(container: FakeContainer) -> ContainerProcess:
    runner = SimpleNamespace(container_name=lambda name: f"plantml-test-{name}")
    process = ContainerProcess(SimpleNamespace(name="s3"), runner)  # type: ignore[arg-type]
    process._container = container  # type: ignore[assignment]
    return process


def test_a_container_removed_behind_the_stacks_back_is_removed_at_stop_without_a_traceback(caplog):
    process = process_of(FakeContainer(status=None))  # docker rm -f: the stack's stop finds nothing to remove
    with caplog.at_level(logging.WARNING):
        process.remove()
    assert caplog.records == []
    assert process.docker_container is None


def test_a_paused_container_is_hung_not_dead_so_the_supervisor_leaves_it():
    """``docker pause``: Docker refuses to start a paused container, so each restart would fail and the stack
    would stop after five, reporting a service that "exited" although it never did (a stopped local process,
    its counterpart, is alive to the host runner too)."""
    process = process_of(FakeContainer(status="paused"))
    assert process.running
    assert process.pid == 4242
    assert not process_of(FakeContainer(status="exited")).running


def test_a_hung_paused_container_is_unpaused_then_killed_so_the_supervisor_can_start_it_again():
    """The health check's kill of a ``docker pause``d service: its container ends exited (not paused, which
    Docker cannot start), on the same folder, for the supervisor to start as one that died."""
    container = FakeContainer(status="paused")
    process = process_of(container)
    process.kill()
    assert container.status == "exited" and not process.running


class NeverCreated(FakeContainer):
    """testcontainers' container described but not created (its creation under way in another thread, or failed)."""

    def get_wrapped_container(self) -> FakeContainer:
        raise ContainerStartException("Container is not started")


def test_a_container_not_created_yet_has_no_pid_and_one_whose_creation_failed_is_made_anew():
    """The stack's services start at once and each one up records every pid: reading one still being created raised
    testcontainers' "Container is not started" in the other's thread, and the stack's start failed."""
    made: list[FakeContainer] = []

    def describe(spec: object, name: str) -> FakeContainer:
        made.append(FakeContainer(status="created"))
        made[-1].start = lambda: setattr(made[-1], "status", "running")  # type: ignore[method-assign]
        return made[-1]

    runner = SimpleNamespace(container_name=lambda name: f"plantml-test-{name}", describe=describe)
    process = ContainerProcess(SimpleNamespace(name="s3", ready=lambda: True, start_timeout=5), runner)  # type: ignore[arg-type]
    process._container = NeverCreated()  # type: ignore[assignment]
    assert process.docker_container is None and process.pid is None and not process.running
    assert process.log_tail() == ""
    process.start()  # the next start describes and creates it again rather than failing on the one never created
    assert len(made) == 1 and process.docker_container is made[0] and process.running and process.pid == 4242
