"""``plantml stack up`` supervises its services, and never outlives itself.

On the session's backend: a service killed under ``stack up`` comes back (one log line,
the same data); ``kill -9`` of ``stack up`` leaves none of its processes or containers
after a few seconds; ``plantml stack prune`` then removes the folder it could not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from botocore.exceptions import BotoCoreError, ClientError
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from plantml.settings import read_env_file
from plantml.stack.endpoints import make_s3_client


@retry(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(90), wait=wait_fixed(0.2), reraise=True)
def eventually(condition) -> bool:
    return condition()


class StackUp:
    """``plantml stack up`` in a subprocess, its output collected line by line."""

    def __init__(self, backend: str, env_file: Path, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "plantml", "stack", "up", "--backend", backend, "--env-file", str(env_file), *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()  # type: ignore[arg-type]

    def output(self) -> str:
        return "".join(self.lines)

    def folder(self) -> Path:
        eventually(lambda: "Press Ctrl-C" in self.output() or self.process.poll() is not None)
        assert "Press Ctrl-C" in self.output(), self.output()[-3000:]
        return Path(next(line.split()[1] for line in self.lines if line.strip().startswith("data:")))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stack_processes(up: subprocess.Popen, docker) -> set[int]:
    """Every process of the stack: ``stack up``'s descendants and, for containers, every process in them."""
    pids = {p.pid for p in psutil.Process(up.pid).children(recursive=True) if "plantml.stack.reaper" not in p.cmdline()}
    for container in containers_of(up, docker):
        main = psutil.Process(container.attrs["State"]["Pid"])
        pids |= {main.pid} | {p.pid for p in main.children(recursive=True)}
    return pids


def docker_of(backend: str):
    """A Docker client on the containers backend (to find the stack's containers), None on the local one."""
    if backend != "containers":
        return None
    from plantml.stack.docker_api import docker_client

    return docker_client()


def containers_of(up: subprocess.Popen, docker) -> list:
    return docker.containers.list(all=True, filters={"label": f"plantml.pid={up.pid}"}) if docker else []


def test_a_killed_service_comes_back_and_kill_9_of_stack_up_leaves_nothing(pytestconfig, tmp_path):
    backend = pytestconfig.getoption("--stack")
    docker = docker_of(backend)
    env_file = tmp_path / "stack.env"
    up = StackUp(backend, env_file)
    try:
        folder = up.folder()
        s3_pid = json.loads((folder / "state.json").read_text())["processes"]["s3"]["pid"]
        env = read_env_file(env_file)
        s3 = make_s3_client(env["MLFLOW_S3_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
        s3.put_object(Bucket="mlflow", Key="before-the-crash.txt", Body=b"leaf")

        os.kill(s3_pid, signal.SIGKILL)  # the object store dies under stack up

        eventually(lambda: "s3 exited unexpectedly; restarting it in 1 s" in up.output())
        eventually(lambda: json.loads((folder / "state.json").read_text())["processes"]["s3"]["pid"] != s3_pid)

        def reads_back() -> bool:  # the new process is recorded as it spawns, before it answers
            try:
                return s3.get_object(Bucket="mlflow", Key="before-the-crash.txt")["Body"].read() == b"leaf"
            except (BotoCoreError, ClientError):  # still starting (a lost object fails too, after 90 s)
                return False

        assert eventually(reads_back)
        assert up.process.poll() is None and up.output().count("exited unexpectedly") == 1
        processes = stack_processes(up.process, docker)
        assert len(processes) >= 3
    finally:
        up.process.send_signal(signal.SIGKILL)
        up.process.wait()

    eventually(lambda: not any(alive(pid) for pid in processes))  # within seconds, not at the next prune
    eventually(lambda: containers_of(up.process, docker) == [])  # the reaper removes them after they stop
    assert folder.is_dir()  # a killed process cleans nothing up itself: prune does
    pruned = subprocess.run([sys.executable, "-m", "plantml", "stack", "prune"], capture_output=True, text=True, timeout=120)
    assert pruned.returncode == 0, pruned.stderr
    # Every stack's start also prunes dead stacks' folders: another pytest worker's may have removed this one first.
    assert f"stack folder {folder}" in pruned.stdout or "removed 0 local leftover(s)" in pruned.stdout
    assert not folder.exists()
    assert not env_file.exists()  # it pointed at the dead stack


def test_a_data_folder_deleted_under_stack_up_stops_it_in_one_line_and_leaves_nothing(pytestconfig, tmp_path):
    """``rm -rf`` of a running stack's ``--data-dir``: its services would go on answering from deleted files and
    failing every write; ``stack up`` stops the stack within seconds instead, naming the folder."""
    backend = pytestconfig.getoption("--stack")
    docker = docker_of(backend)
    folder = Path(tempfile.mkdtemp(prefix="plantml-deleted-"))  # not under tmp_path: PostgreSQL's account may enter it
    up = StackUp(backend, tmp_path / "stack.env", "--data-dir", str(folder))
    try:
        assert up.folder() == folder, up.output()[-3000:]
        processes = stack_processes(up.process, docker)
        assert len(processes) >= 3
        shutil.rmtree(folder, ignore_errors=True)  # the services still write into it: what they recreate stays
        deleted = time.monotonic()
        assert up.process.wait(timeout=60) == 1
        assert time.monotonic() - deleted < 8  # noticed within a second; killed, as a graceful stop saves nothing
    finally:
        if up.process.poll() is None:
            up.process.kill()
            up.process.wait()
        shutil.rmtree(folder, ignore_errors=True)
    said = [line for line in up.lines if "deleted or moved" in line]
    assert said == [f"plantml: error: stack: data folder {folder} was deleted or moved while the stack ran: stopping, as its "
                    "services would write into it no more\n"], up.output()[-2000:]
    eventually(lambda: not any(alive(pid) for pid in processes))
    eventually(lambda: containers_of(up.process, docker) == [])
    assert not (tmp_path / "stack.env").exists()


@pytest.mark.local_session  # the record is written by code both backends share
def test_a_service_that_dies_once_the_disk_is_full_still_comes_back():
    """Its restart records the new pid in state.json, which a full disk refused: each restart was stopped again
    (a traceback each time) and after five the whole stack stopped, though the service itself needs no space."""
    import requests

    disk = Path(tempfile.mkdtemp(prefix="plantml-full-"))
    disk.chmod(0o711)  # PostgreSQL's account enters it
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=711", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:  # fails rather than skips: CI runs as root, and a skip would pass for green there
        shutil.rmtree(disk, ignore_errors=True)
        pytest.fail(f"mounting a tmpfs needs root: {mounted.stderr.strip()}")
    env_file = disk.parent / f"{disk.name}.env"
    up = StackUp("local", env_file, "--data-dir", str(disk / "stack"))
    try:
        folder = up.folder()
        mlflow_pid = json.loads((folder / "state.json").read_text())["processes"]["mlflow"]["pid"]
        with open(disk / "ballast", "wb", buffering=0) as ballast, contextlib.suppress(OSError):
            while ballast.write(b"\0" * (1 << 20)):
                pass

        os.killpg(mlflow_pid, signal.SIGKILL)  # the MLflow server dies (the OOM killer) on the full disk

        uri = read_env_file(env_file)["MLFLOW_TRACKING_URI"]

        def answers() -> bool:
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"{uri}/health", timeout=2).status_code == 200
            return False

        eventually(lambda: "mlflow exited unexpectedly" in up.output())
        assert eventually(answers)
        assert up.process.poll() is None
        assert "Traceback" not in up.output()
        assert f"stack data folder {folder}: no space left on device: the pids of this start are not recorded" \
            in up.output()
    finally:
        up.process.send_signal(signal.SIGINT)
        try:
            up.process.wait(timeout=60)
        finally:
            up.process.kill()
            up.process.wait()
            subprocess.run(["umount", "-l", str(disk)], check=False)
            shutil.rmtree(disk, ignore_errors=True)
            env_file.unlink(missing_ok=True)
