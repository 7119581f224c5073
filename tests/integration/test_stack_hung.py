"""A hung service (alive, silent): what the stack does with it.

On the local backend every process of PostgreSQL is stopped with SIGSTOP (its postmaster and
each backend: they run in sessions of their own); on the containers backend its container is
paused (``docker pause``).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path

import mlflow
import psutil
import pytest


def hang(process, backend: str) -> None:
    """Stop the service without killing it: pause its container, or SIGSTOP every process of it."""
    if backend == "containers":
        process.docker_container.pause()
        return
    main = psutil.Process(process.pid)
    for member in [main, *main.children(recursive=True)]:
        member.send_signal(signal.SIGSTOP)


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_hung_database_stopped_with_its_stack_leaves_no_process_and_its_folder_starts_again(
        mlflow_stack_factory, pytestconfig):
    """The stop of a stack whose PostgreSQL hangs kills it after its grace; before, the SIGKILL reached only the
    postmaster: its children (sessions of their own, stopped) stayed for good, holding its shared memory, and the
    next start on the folder failed ("pre-existing shared memory block is still in use")."""
    if pytestconfig.getoption("--stack") == "containers":
        pytest.skip("docker kills a container whole")
    data = Path(tempfile.mkdtemp(prefix="plantml-hung-"))  # not tmp_path: PostgreSQL's account must enter it
    stack = mlflow_stack_factory("direct", data_dir=data).start()
    experiment = mlflow.MlflowClient(stack.tracking_uri).create_experiment("written-before-the-hang")
    main = psutil.Process(stack.services["postgres"].process.pid)
    family = [main, *main.children(recursive=True)]
    hang(stack.services["postgres"].process, "local")

    stack.stop()

    assert [member.pid for member in family if alive(member)] == []  # none left stopped: each killed
    try:
        with mlflow_stack_factory("direct", data_dir=data) as again:
            assert mlflow.MlflowClient(again.tracking_uri).get_experiment(experiment).name == "written-before-the-hang"
    finally:
        shutil.rmtree(data, ignore_errors=True)
