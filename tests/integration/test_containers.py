"""The containers backend: failures are clear and leave no container; killed sessions are cleaned up.

Part of the ``--stack containers`` session (each test builds its own stacks); needs Docker
and the images of ``plantml stack build-images``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import requests
from click.testing import CliRunner
from plantml.stack.services import PostgresSpec

from plantml.errors import StackError
from plantml.stack.containers import LABEL, LABEL_PID, ContainersStack, MLflowContainer, Placement, PostgresContainer, docker_client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def docker():
    """The Docker client (this file is collected only in a ``--stack containers`` session: see conftest.py)."""
    return docker_client()


def _containers_of(docker, **labels: str) -> list:
    filters = [LABEL] + [f"{key}={value}" for key, value in labels.items()]
    return docker.containers.list(all=True, filters={"label": filters})


def test_a_missing_image_says_to_run_build_images_and_starts_nothing(docker, monkeypatch):
    monkeypatch.setenv("PLANTML_MLFLOW_IMAGE", "plantml/no-such-image:0")
    stack = ContainersStack()
    with pytest.raises(StackError, match=r"mlflow: image 'plantml/no-such-image:0' .*plantml stack build-images"):
        stack.start()
    assert _containers_of(docker, **{LABEL: stack.stack_id}) == []


def test_a_failed_start_shows_the_containers_log_and_removes_every_container(docker, monkeypatch):
    monkeypatch.setattr(MLflowContainer, "command", lambda self: ["mlflow", "server", "--no-such-flag"])
    stack = ContainersStack()
    with pytest.raises(StackError) as failure:
        stack.start()
    assert failure.value.service == "mlflow"
    assert "exited with code" in failure.value.cause
    assert "no-such-flag" in failure.value.log_tail  # the container's own output
    assert "--- last lines of the mlflow log ---" in str(failure.value)
    assert _containers_of(docker, **{LABEL: stack.stack_id}) == []


def test_every_endpoint_is_on_loopback_and_stop_removes_the_containers(docker):
    with ContainersStack() as stack:
        endpoints = stack.endpoints
        assert endpoints.tracking_uri.startswith("http://127.0.0.1:")
        assert endpoints.s3_endpoint.startswith("http://127.0.0.1:")
        assert "@127.0.0.1:" in endpoints.database_uri
        assert requests.get(f"{stack.tracking_uri}/health", timeout=5).status_code == 200
        assert len(_containers_of(docker, **{LABEL: stack.stack_id})) == 3
    assert _containers_of(docker, **{LABEL: stack.stack_id}) == []


SESSION = textwrap.dedent("""
    import time
    from plantml.stack.containers import ContainersStack
    stack = ContainersStack().start()
    print("READY", flush=True)
    time.sleep(600)
""")


def _killed_session(docker) -> str:
    """A process that starts a stack and is SIGKILLed before any teardown; returns its pid."""
    proc = subprocess.Popen([sys.executable, "-c", SESSION], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(_containers_of(docker, **{LABEL_PID: str(proc.pid)})) == 3  # left behind, as a killed session would
    return str(proc.pid)


def test_a_killed_session_leaves_no_container_once_the_next_stack_starts(docker):
    pid = _killed_session(docker)
    with ContainersStack():
        assert _containers_of(docker, **{LABEL_PID: pid}) == []


def test_stack_prune_removes_a_killed_sessions_containers(docker):
    from plantml.cli.stack import stack as stack_command

    pid = _killed_session(docker)
    result = CliRunner().invoke(stack_command, ["prune"])
    assert result.exit_code == 0, result.output
    assert "removed 3 container(s)" in result.output
    assert _containers_of(docker, **{LABEL_PID: pid}) == []


# Stopping, starting and restarting one service: test_stack_faults.py, which runs on this backend too.


# -- container descriptions (testcontainers needs a daemon even to describe one) --------------


def test_on_a_bridge_services_bind_every_interface_and_reach_each_other_by_name():
    placement = Placement("bridge", 40000, 5432, "plantml-x-postgres")
    pg = PostgresContainer("img", placement, {}, "plantml-x-postgres", spec=PostgresSpec(), network_name="net")
    assert "listen_addresses=0.0.0.0" in pg.command()
    assert "@plantml-x-postgres:5432/" in pg.backend_uri()
    assert pg.make_container().ports == {"5432/tcp": ("127.0.0.1", 40000)}  # published on loopback only


def test_on_the_host_network_nothing_is_published_and_every_container_is_labelled():
    pg = PostgresContainer("img", Placement("host", 15432, 15432, "127.0.0.1"), {"plantml.stack": "abc"}, "c",
                           spec=PostgresSpec())
    container = pg.make_container()
    assert container.ports == {}
    assert container._kwargs["network"] == "host"
    assert container._kwargs["labels"] == {"plantml.stack": "abc"}
    assert container._kwargs["stop_signal"] == "SIGINT"  # fast shutdown, MLflow's connections do not hold it up
