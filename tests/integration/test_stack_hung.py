"""A hung service (alive, silent) is noticed by the supervisor's health check, killed and restarted on its data.

On the local backend every process of PostgreSQL is stopped with SIGSTOP (its postmaster and
each backend: they run in sessions of their own); on the containers backend its container is
paused (``docker pause``). Either way its process looks alive; before the health check the stack
kept it as it was for good, and every client waited on it (``plantml registry list``: 102 s, then
"tracking server not reachable").
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow.exceptions import MlflowException
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed


@retry(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(90), wait=wait_fixed(0.2), reraise=True)
def eventually(condition) -> bool:
    return condition()


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


def test_a_hung_database_is_killed_and_restarted_on_its_data(mlflow_stack_factory, pytestconfig, caplog):
    backend = pytestconfig.getoption("--stack")
    with mlflow_stack_factory("direct", health_window=4) as stack, \
            caplog.at_level(logging.WARNING, logger="plantml.stack.supervisor"):
        client = mlflow.MlflowClient(stack.tracking_uri)
        experiment = client.create_experiment("written-before-the-hang")
        process = stack.services["postgres"].process
        hung_pid = process.pid
        hung = psutil.Process(hung_pid)

        hang(process, backend)
        hung_at = time.monotonic()

        eventually(lambda: "postgres did not answer for" in caplog.text)
        noticed = time.monotonic() - hung_at

        def reads_back() -> bool:
            try:
                return client.get_experiment(experiment).name == "written-before-the-hang"
            except MlflowException:  # still restarting
                return False

        assert eventually(reads_back)
        assert process.pid not in (None, hung_pid) and not alive(hung)  # killed, a new one serves
        assert process.running and stack.services["postgres"].failures == 1
    assert 4 <= noticed < 30, noticed
    [line] = [record.getMessage() for record in caplog.records if record.name == "plantml.stack.supervisor"]
    assert "readiness checks failed in a row): killed it; restarting it in 1 s (restart 1 of at most 5 in a row)" in line


@pytest.mark.local_session  # Docker kills a container whole: only local processes can leave stopped children
def test_a_hung_database_stopped_with_its_stack_leaves_no_process_and_its_folder_starts_again(mlflow_stack_factory,
                                                                                              monkeypatch):
    """The stop of a stack whose PostgreSQL hangs kills it after its grace; before, the SIGKILL reached only the
    postmaster: its children (sessions of their own, stopped) stayed for good, holding its shared memory, and the
    next start on the folder failed ("pre-existing shared memory block is still in use")."""
    data = Path(tempfile.mkdtemp(prefix="plantml-hung-"))  # not tmp_path: PostgreSQL's account must enter it
    stack = mlflow_stack_factory("direct", data_dir=data, health_window=0).start()
    experiment = mlflow.MlflowClient(stack.tracking_uri).create_experiment("written-before-the-hang")
    main = psutil.Process(stack.services["postgres"].process.pid)
    family = [main, *main.children(recursive=True)]
    hang(stack.services["postgres"].process, "local")
    monkeypatch.setattr("plantml.stack.host.STOP_TIMEOUT", 3)  # the grace before the kill: its length is not the subject

    stack.stop()

    assert [member.pid for member in family if alive(member)] == []  # none left stopped: each killed
    try:
        with mlflow_stack_factory("direct", data_dir=data) as again:
            assert mlflow.MlflowClient(again.tracking_uri).get_experiment(experiment).name == "written-before-the-hang"
    finally:
        shutil.rmtree(data, ignore_errors=True)
