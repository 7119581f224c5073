"""Supervision (restart, backoff, limit) and the stack's folder (lock, owner-only files, prune), without services."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from plantml.errors import ConfigError, StackError
from plantml.processes import process_start_time
from plantml.stack.folder import CREDENTIALS, ENV_FILE_HEADER, StackFolder
from plantml.stack.leftovers import prune_local_stacks
from plantml.stack.service import ServiceSpec
from plantml.stack.supervisor import Service, Supervisor, backoff


class FakeProcess:
    """A process that can be told to die, and whose starts can be made to fail."""

    def __init__(self, spec: ServiceSpec, failing_restarts: int = 0) -> None:
        self.spec = spec
        self.alive = False
        self.starts = 0
        self.failing_restarts = failing_restarts

    @property
    def running(self) -> bool:
        return self.alive

    @property
    def pid(self) -> int | None:
        return 4242 if self.alive else None

    def start(self) -> None:
        self.starts += 1
        if 1 < self.starts <= 1 + self.failing_restarts:
            raise StackError(self.spec.name, "exited while starting")
        self.alive = True

    def stop(self) -> None:
        self.alive = False

    remove = kill = stop

    def log_tail(self, lines: int | None = 25) -> str:
        return "the fake's last words"

    def trim_log(self) -> None:
        pass


def started(failing_restarts: int = 0, ready=lambda: True) -> Service:
    spec = ServiceSpec(name="postgres", command=("postgres",), folder=Path("/nowhere"), port=1, ready=ready)
    service = Service(spec, FakeProcess(spec, failing_restarts))
    service.start()
    return service


@retry(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(10), wait=wait_fixed(0.05), reraise=True)
def eventually(condition) -> bool:
    return condition()


def test_the_wait_before_a_restart_doubles_up_to_a_cap():
    assert [backoff(failures, 30) for failures in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_service_that_dies_is_restarted_with_one_log_line(caplog):
    service = started()
    supervisor = Supervisor({"postgres": service}, interval=0.01, max_backoff=0.01)
    try:
        with caplog.at_level(logging.WARNING, logger="plantml.stack.supervisor"):
            service.process.alive = False  # killed behind the stack's back
            eventually(lambda: service.running)
    finally:
        supervisor.stop()
    assert service.process.starts == 2
    assert [record.getMessage() for record in caplog.records] == [
        "postgres exited unexpectedly; restarting it in 0 s (restart 1 of at most 5 in a row)"]


def test_a_running_service_that_stops_answering_is_killed_and_restarted_with_one_log_line(caplog):
    """Alive but silent (SIGSTOP, docker pause): its process looks fine, its readiness check says otherwise."""
    answers = {"now": True}
    service = started(ready=lambda: answers["now"])
    supervisor = Supervisor({"postgres": service}, interval=0.01, max_backoff=0.01, health_window=0.4)
    try:
        with caplog.at_level(logging.WARNING, logger="plantml.stack.supervisor"):
            time.sleep(1)  # answering: left alone
            assert service.process.starts == 1
            answers["now"] = False  # hung
            eventually(lambda: service.process.starts == 2)
            answers["now"] = True  # the restart answers
            time.sleep(1)
    finally:
        supervisor.stop()
    assert service.running and service.process.starts == 2
    [line] = [record.getMessage() for record in caplog.records]
    assert re.fullmatch(r"postgres did not answer for \d+ s \([3-9] readiness checks failed in a row\): killed it; "
                        r"restarting it in 0 s \(restart 1 of at most 5 in a row\)", line), line


def test_a_slow_service_that_answers_within_the_window_is_never_killed():
    """A loaded machine: probes that take most of their interval, and a few that fail, are not a hang."""
    calls = {"n": 0}

    def slow_and_sometimes_silent() -> bool:
        calls["n"] += 1
        time.sleep(0.05)
        return calls["n"] % 3 != 0  # every third probe fails: never three in a row

    service = started(ready=slow_and_sometimes_silent)
    supervisor = Supervisor({"postgres": service}, interval=0.01, max_backoff=0.01, health_window=0.4)
    try:
        time.sleep(2)
    finally:
        supervisor.stop()
    assert calls["n"] >= 10 and service.process.starts == 1


def test_a_service_stopped_on_purpose_stays_stopped():
    service = started()
    supervisor = Supervisor({"postgres": service}, interval=0.01, max_backoff=0.01)
    try:
        service.stop()
        time.sleep(0.5)  # fifty rounds of the supervisor
    finally:
        supervisor.stop()
    assert not service.running and service.process.starts == 1


def test_a_service_that_cannot_come_back_is_given_up_after_the_limit():
    service = started(failing_restarts=10)
    supervisor = Supervisor({"postgres": service}, interval=0.01, max_restarts=2, max_backoff=0.01)
    service.process.alive = False
    with pytest.raises(StackError, match=r"^postgres: exited 3 times in a row; not restarted again") as given_up:
        supervisor.wait()
    assert "the fake's last words" in str(given_up.value)
    assert service.process.starts == 3  # the first start, then two failed restarts


def test_services_that_die_together_come_back_together_though_one_waits_for_the_other():
    """MLflow and PostgreSQL killed at once: MLflow's restart waits until its database answers, so PostgreSQL's
    restart must not wait behind it (one after the other, it began only once MLflow's start had timed out)."""
    database = started()
    spec = ServiceSpec(name="mlflow", command=("mlflow",), folder=Path("/nowhere"), port=2, ready=lambda: True)
    server = Service(spec, FakeProcess(spec))
    server.start()

    def start_then_wait_for_the_database() -> None:
        FakeProcess.start(server.process)
        if not wait_for(lambda: database.running):
            raise StackError("mlflow", "not ready after 3 s")

    server.process.start = start_then_wait_for_the_database  # type: ignore[method-assign]
    supervisor = Supervisor({"mlflow": server, "postgres": database}, interval=0.01, max_backoff=0.01)
    try:
        server.process.alive = database.process.alive = False
        assert wait_for(lambda: database.running and server.running)
    finally:
        supervisor.stop()
    assert supervisor.failure is None and database.process.starts == 2


def wait_for(condition, seconds: float = 3) -> bool:
    """Whether ``condition`` holds within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- the folder -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def own_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))


def test_a_data_folder_in_use_is_refused_in_one_line_naming_it(tmp_path):
    first = StackFolder.open(tmp_path / "data", "first")
    try:
        with pytest.raises(StackError) as refused:
            StackFolder.open(tmp_path / "data", "second")
    finally:
        first.close()
    assert str(refused.value) == f"stack: data folder {tmp_path / 'data'} is in use by a running stack (pid {os.getpid()})"
    StackFolder.open(tmp_path / "data", "third").close()  # free again once the first is closed


def test_a_data_dir_stays_with_owner_only_credentials_and_a_temporary_folder_goes(tmp_path):
    kept = StackFolder.open(tmp_path / "data", "kept")
    kept.write_json(CREDENTIALS, {"postgres": {"password": "x"}})
    kept.close()
    assert (tmp_path / "data" / CREDENTIALS).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o711  # traversable by a service's account, not listable
    temporary = StackFolder.open(None, "temporary")
    assert temporary.path.is_dir()
    temporary.close()
    assert not temporary.path.exists()


KILLED_OWNER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from pathlib import Path
    from plantml.processes import process_start_time
    from plantml.stack.folder import SERVICE_MARK, STATE, StackFolder
    folder = StackFolder.open(None, "killed")
    folder.write_env_file(Path(sys.argv[1]), {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"})
    # a stand-in SeaweedFS: its program named weed, its command line naming its folder in the stack's
    weed = Path(sys.argv[3]) / "weed"
    weed.symlink_to("/bin/sh")
    service = subprocess.Popen([str(weed), "-c", "sleep 300; true", f"-dir={folder.path}/s3/data"], start_new_session=True,
                               env={**os.environ, SERVICE_MARK: str(folder.path / "s3")})  # as the local runner starts it
    if sys.argv[2] == "recorded":  # else killed between the spawn and its record
        folder.write_json(STATE, {"processes": {"s3": {"pid": service.pid, "started": process_start_time(service.pid)}}})
    print(json.dumps({"folder": str(folder.path), "pid": service.pid}), flush=True)
    time.sleep(300)
""")


@pytest.mark.parametrize("record", ["recorded", "unrecorded"])
def test_prune_cleans_up_after_an_owner_killed_with_sigkill(tmp_path, monkeypatch, record):
    from plantml.stack import folder as stack_folder

    monkeypatch.setattr(stack_folder, "GRACE_S", 1.0)  # this stand-in service ignores its owner's death
    env_file = tmp_path / "stack.env"
    owner = subprocess.Popen([sys.executable, "-c", KILLED_OWNER, str(env_file), record, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    left = json.loads(owner.stdout.readline())
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert Path(left["folder"]).is_dir() and process_start_time(left["pid"]) is not None  # what a kill -9 leaves
    assert env_file.exists()  # pointing at a dead server

    removed = prune_local_stacks()

    assert f"{'s3' if record == 'recorded' else 'weed (unrecorded)'} process {left['pid']}" in removed
    assert not Path(left["folder"]).exists()
    assert not env_file.exists() and f"env file {env_file}" in removed
    assert process_start_time(left["pid"]) is None or _is_zombie(left["pid"])  # gone before prune returned


def test_prune_leaves_alone_a_live_stack_whose_folder_path_contains_the_dead_stacks(tmp_path, monkeypatch):
    """A backup restored with tar (which drops the leading /) serves /srv/plantml's data from
    /restore/srv/plantml: its weed's ``-dir=`` contains the path of a dead stack at /srv/plantml without being
    in it, and that stack's prune killed it (and its PostgreSQL: SIGKILL, 10 s each, then the live stack's
    supervisor brought them back)."""
    from plantml.stack import folder as stack_folder

    monkeypatch.setattr(stack_folder, "GRACE_S", 1.0)
    dead = tmp_path / "srv" / "plantml"
    subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; from plantml.stack.folder import "
                    "StackFolder; StackFolder.open(Path(sys.argv[1]), 'dead'); os._exit(0)", str(dead)], check=True)
    restored = tmp_path / "restore" / str(dead).lstrip("/")
    (tmp_path / "weed").symlink_to("/bin/sh")  # a stand-in SeaweedFS of the restored stack, leading its own group
    live = subprocess.Popen([str(tmp_path / "weed"), "-c", "sleep 300; true", f"-dir={restored}/s3/data"],
                            start_new_session=True)
    try:
        removed = prune_local_stacks()

        assert removed == [f"lock of {dead}"]
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()


def test_prune_leaves_alone_a_postgres_a_person_runs_on_the_dead_stacks_database(tmp_path, monkeypatch):
    """After a crash someone repairs the dead stack's database (``postgres --single -D DIR/postgres/data``); any
    start elsewhere prunes that stack, and its prune took the repair for the stack's own server (its command line
    names the folder) and SIGKILLed it 10 s on."""
    from plantml.stack import folder as stack_folder

    monkeypatch.setattr(stack_folder, "GRACE_S", 1.0)
    dead = tmp_path / "stack"
    subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; from plantml.stack.folder import "
                    "StackFolder; StackFolder.open(Path(sys.argv[1]), 'dead'); os._exit(0)", str(dead)], check=True)
    (tmp_path / "postgres").symlink_to("/bin/sh")  # a stand-in PostgreSQL, started from a person's shell
    repair = subprocess.Popen([str(tmp_path / "postgres"), "-c", "sleep 300; true", "--single", "-D",
                               f"{dead}/postgres/data", "mlflow"], start_new_session=True)
    try:
        removed = prune_local_stacks()

        assert removed == [f"lock of {dead}"]
        assert repair.poll() is None
    finally:
        repair.kill()
        repair.wait()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_env_file_goes_with_the_stack_unless_someone_rewrote_it(tmp_path):
    ours, theirs = tmp_path / "ours.env", tmp_path / "theirs.env"
    for path in (ours, theirs):
        folder = StackFolder.open(None, path.stem)
        folder.write_env_file(path, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "AWS_SECRET_ACCESS_KEY": "s"})
        assert path.read_text() == ENV_FILE_HEADER + "MLFLOW_TRACKING_URI=http://127.0.0.1:1\nAWS_SECRET_ACCESS_KEY=s\n"
        assert path.stat().st_mode & 0o777 == 0o600
        if path is theirs:
            path.write_text("MLFLOW_TRACKING_URI=http://127.0.0.1:2\n")
        folder.close()
    assert not ours.exists()
    assert theirs.read_text() == "MLFLOW_TRACKING_URI=http://127.0.0.1:2\n"


@pytest.mark.parametrize("planted", ["world-readable file", "symlink"])
def test_a_file_planted_where_a_secret_is_written_is_neither_followed_nor_kept(tmp_path, planted):
    """Another account that can write beside a secret file (a service's folder is owned by its account) plants
    the temporary file a writer would use: the secret still ends 0600, and a link's target stays untouched."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    folder = StackFolder.open(None, "planted")
    targets = (tmp_path / "stack.env", folder.path / CREDENTIALS)
    for target in targets:
        for tmp in (target.with_name(target.name + ".tmp"), target.with_name(f".{target.name}.tmp")):
            if planted == "symlink":
                tmp.symlink_to(victim)
            else:
                tmp.write_text("")
                tmp.chmod(0o644)
    try:
        folder.write_env_file(targets[0], {"AWS_SECRET_ACCESS_KEY": "s"})
        folder.write_json(CREDENTIALS, {"s3": {"secret_key": "s"}})
        for target in targets:
            assert target.stat().st_mode & 0o777 == 0o600 and not target.is_symlink()
        assert victim.read_text() == "precious\n"
    finally:
        folder.close()


def test_prune_leaves_a_live_stack_alone(tmp_path):
    live = StackFolder.open(tmp_path / "live", "live")
    try:
        assert prune_local_stacks() == []
        assert live.path.is_dir()
    finally:
        live.close()


def test_a_data_folder_postgres_cannot_reach_is_refused_in_one_line_naming_the_account(tmp_path):
    from plantml.stack.host import HostRunner

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    spec = ServiceSpec(name="postgres", command=("postgres",), folder=private / "stack" / "postgres", port=1,
                       ready=lambda: True, refuses_root=True)
    spec.folder.mkdir(parents=True)
    runner = HostRunner()
    runner.open("x", tmp_path)
    if os.geteuid() != 0:  # PostgreSQL runs as us, who made the folder
        assert runner.process(spec).spec is spec
        return
    with pytest.raises(StackError) as refused:
        runner.process(spec)
    assert str(refused.value).startswith(f"postgres: runs as user {spec.account.name} (plantml runs as root), who cannot "
                                         f"enter {spec.folder}")
    assert "\n" not in str(refused.value)


def test_a_non_empty_folder_that_holds_no_stack_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"^--data-dir {tmp_path}: not empty and holds no plantml stack"):  # exit 2
        StackFolder.open(tmp_path, "x")
    assert (tmp_path / "notes.txt").read_text() == "mine" and tmp_path.stat().st_mode & 0o777 != 0o711
