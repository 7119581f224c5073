"""A kept data folder after crashes and full disks: every start says what is wrong in one line, and one bad
folder never stops the other stacks from starting. No service runs: each start fails before any would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plantml.errors import StackError
from plantml.stack.folder import CREDENTIALS, STATE, StackFolder
from plantml.stack.postgres import PostgresSpec, postgres_service
from plantml.stack.service import Network
from plantml.stack.stack import ManagedStack, initialize

#: A stack's owner killed with kill -9 right after it opened its folder: its record and its folder stay, unlocked.
KILLED = "import os, sys; from pathlib import Path; from plantml.stack.folder import StackFolder; " \
         "StackFolder.open(Path(sys.argv[1]), 'killed'); os._exit(0)"


@pytest.fixture(autouse=True)
def own_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))


def plantml(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plantml", *args], capture_output=True, text=True, timeout=120)


def test_a_dead_stacks_state_file_cut_short_by_a_crash_stops_neither_prune_nor_the_next_start(tmp_path):
    """Every start prunes the stacks killed before it first: one bad file there used to stop them all (a traceback)."""
    folder = tmp_path / "killed"
    subprocess.run([sys.executable, "-c", KILLED, str(folder)], check=True)
    (folder / STATE).write_text("")  # what a crash leaves of a file whose data had not reached the disk

    result = plantml("stack", "prune")

    assert result.returncode == 0
    assert result.stderr == f"prune: data folder {folder}: {STATE} cannot be read (not valid JSON: Expecting value: " \
                            "line 1 column 1 (char 0)); its processes are not waited for\n"
    assert result.stdout.splitlines()[1] == f"removed 1 local leftover(s): lock of {folder}"


def test_credentials_cut_short_by_a_crash_are_named_in_one_line(tmp_path):
    folder = tmp_path / "kept"
    StackFolder.open(folder, "first").close()
    (folder / CREDENTIALS).write_text('{"postgres": {"pass')

    result = plantml("stack", "up", "--data-dir", str(folder))

    assert result.returncode == 1
    assert result.stderr.startswith(f"plantml: error: stack: data folder {folder}: {CREDENTIALS} cannot be read (not "
                                    "valid JSON: ")
    assert result.stderr.count("\n") == 1
    assert (folder / CREDENTIALS).read_text() == '{"postgres": {"pass'  # left as it was, for its owner to repair


@pytest.fixture
def full_disk(tmp_path):
    """A full 256 KiB tmpfs at ``tmp_path/disk`` (mounting needs root, which CI has), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.strip()}")
    try:
        with open(disk / "ballast", "wb", buffering=0) as out:
            while out.write(b"\0" * 4096):
                pass
    except OSError:
        pass
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.parametrize("full", ["data folder", "cache folder"])
def test_a_full_disk_under_the_data_or_cache_folder_is_one_line_naming_it(tmp_path, full_disk, full, monkeypatch):
    data = full_disk / "stack" if full == "data folder" else tmp_path / "stack"
    if full == "cache folder":
        monkeypatch.setenv("PLANTML_CACHE_DIR", str(full_disk / "cache"))
    (full_disk / "cache" / "stacks").mkdir(parents=True)

    result = plantml("stack", "up", "--data-dir", str(data))

    named = data if full == "data folder" else full_disk / "cache" / "stacks"
    assert result.returncode == 1
    assert result.stderr.startswith("plantml: error: ") and f"{named}: no space left on device" in result.stderr
    assert result.stderr.count("\n") == 1
    assert plantml("stack", "prune").returncode == 0  # and nothing was left locked or recorded that prune chokes on


class InitdbRunner:
    """Runs a service's init as initdb would: PG_VERSION first, then the rest; ``killed`` stops it half-way."""

    def __init__(self, killed: bool) -> None:
        self.killed = killed

    def run_once(self, spec, command) -> None:
        cluster = Path(command[command.index("-D") + 1])
        cluster.mkdir(parents=True)
        (cluster / "PG_VERSION").write_text("15\n")
        if self.killed:
            raise StackError(spec.name, "initdb failed with exit code -9")
        (cluster / "global").mkdir()
        (cluster / "global" / "pg_control").write_bytes(b"complete")


def test_a_first_start_killed_during_initdb_leaves_no_cluster_that_looks_initialised(tmp_path):
    """Killed half-way (a crash, kill -9 of its process group), initdb used to leave PG_VERSION in the cluster:
    every later start took it for a cluster, waited 30 s for a server that crash-looped, and failed."""
    spec = postgres_service(PostgresSpec(), tmp_path / "postgres", 1, Network())
    with pytest.raises(StackError):
        initialize(InitdbRunner(killed=True), spec)
    assert not spec.is_initialized()  # so the next start initialises it again

    initialize(InitdbRunner(killed=False), spec)  # the next start: the half-made cluster is replaced

    assert spec.is_initialized()
    assert (spec.folder / "data" / "global" / "pg_control").read_bytes() == b"complete"
    assert sorted(path.name for path in spec.folder.iterdir()) == ["data"]


#: A stack's owner killed with kill -9 while its service (here one that ignores its owner's death) still runs.
KILLED_WITH_A_SERVICE = (
    "import json, os, subprocess, sys; from pathlib import Path; "
    "from plantml.processes import process_start_time; from plantml.stack.folder import STATE, StackFolder; "
    "folder = StackFolder.open(Path(sys.argv[1]), 'killed'); "
    "service = subprocess.Popen(['sleep', '300'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, "
    "start_new_session=True); "
    "folder.write_json(STATE, {'processes': {'s3': {'pid': service.pid, 'started': process_start_time(service.pid)}}}); "
    "print(service.pid, flush=True); os._exit(0)"
)
#: Another start's prune, whose wait for the killed stack's service is cut to 2 s.
PRUNE = "from plantml.stack import folder, leftovers; folder.GRACE_S = 2.0; print(leftovers.prune_local_stacks(), flush=True)"


def test_a_stack_started_again_on_its_folder_waits_for_another_starts_prune_of_it(tmp_path):
    """Every start prunes the stacks killed before it: while one (an unrelated start) ends the killed stack's
    services it holds that stack's folder lock, and the stack started again on that folder was refused, naming
    the unrelated start as "a running stack"."""
    folder = tmp_path / "kept"
    service = int(subprocess.run([sys.executable, "-c", KILLED_WITH_A_SERVICE, str(folder)], capture_output=True,
                                 text=True, check=True).stdout)
    pruner = subprocess.Popen([sys.executable, "-c", PRUNE], stdout=subprocess.PIPE, text=True)
    try:
        while not (folder / ".lock").read_text().startswith(str(pruner.pid)):  # the other start is pruning it now
            assert pruner.poll() is None
            time.sleep(0.02)

        restarted = StackFolder.open(folder, "restarted")  # waits for that prune, rather than refusing

        restarted.close()
        assert f"s3 process {service}" in pruner.communicate(timeout=30)[0]
    finally:
        pruner.kill()
        subprocess.run(["kill", "-9", str(service)], capture_output=True)


class NoServices:
    """A runner that must not be asked for any service."""

    backend = "none"
    network = Network()

    def open(self, stack_id, folder) -> None:
        raise AssertionError("the start went on to run services")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("left", ["no file", "an empty object"])
def test_a_folder_whose_credentials_are_gone_is_refused_before_new_ones_replace_them(tmp_path, left):
    folder = tmp_path / "kept"
    StackFolder.open(folder, "first").close()
    (folder / "postgres" / "data").mkdir(parents=True)
    (folder / "postgres" / "data" / "PG_VERSION").write_text("15\n")
    if left == "an empty object":  # was reported as no file at all
        (folder / CREDENTIALS).write_text("{}")

    with pytest.raises(StackError) as refused:
        ManagedStack(NoServices(), data_dir=folder).start()

    said = f"an empty {CREDENTIALS} (emptied" if left == "an empty object" else f"no {CREDENTIALS} (deleted"
    assert str(refused.value) == (f"stack: data folder {folder} holds a stack's data but {said}, or lost "
                                  "in a crash): its database cannot be opened without it; restore the file, or start "
                                  "on a new folder")
    kept = (folder / CREDENTIALS).read_text() if (folder / CREDENTIALS).exists() else None
    assert kept == ("{}" if left == "an empty object" else None)  # never replaced by new ones


def test_the_credentials_are_on_disk_before_the_start_goes_on(tmp_path, monkeypatch):
    """PostgreSQL syncs the cluster initdb makes with the password: its credentials must not wait in the page cache."""
    synced = []
    sync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or sync(fd))
    folder = StackFolder.open(tmp_path / "kept", "kept")
    try:
        synced.clear()
        folder.write_json(CREDENTIALS, {"postgres": {"password": "p"}})
    finally:
        folder.close()
    assert len(synced) == 2
    assert Path(synced[0]).name.startswith(f".{CREDENTIALS}.")  # the new file's content, before its rename
    assert synced[1] == str(folder.path)  # then the rename itself


class Forever:
    """A service process that never dies, and counts its starts."""

    def __init__(self, spec) -> None:
        self.spec, self.starts, self.alive = spec, 0, False

    running = property(lambda self: self.alive)
    pid = None

    def start(self) -> None:
        self.starts, self.alive = self.starts + 1, True

    def stop(self) -> None:
        self.alive = False

    remove = stop

    def log_tail(self, lines: int | None = 25) -> str:
        return ""

    def trim_log(self) -> None:
        pass


@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_a_data_folder_deleted_or_moved_under_a_running_stack_stops_it_naming_the_folder(tmp_path, how):
    """Its services went on answering from deleted files, failing every write with a 500, then their restarts made an
    empty folder in its place (which the next start refused as "holds no plantml stack"), and the stop said "data kept
    in" it."""
    from plantml.stack.service import ServiceSpec
    from plantml.stack.supervisor import Service, Supervisor

    folder = StackFolder.open(tmp_path / "kept", "kept")
    spec = ServiceSpec(name="s3", command=("weed",), folder=folder.path / "s3", port=1, ready=lambda: True)
    service = Service(spec, Forever(spec))
    service.start()
    supervisor = Supervisor({"s3": service}, interval=0.01, watch=folder.gone)
    try:
        if how == "deleted":
            shutil.rmtree(folder.path)
        else:
            folder.path.rename(tmp_path / "elsewhere")
        with pytest.raises(StackError) as stopped:
            supervisor.wait()
    finally:
        supervisor.stop()
        folder.close()
    assert str(stopped.value) == (f"stack: data folder {folder.path} was deleted or moved while the stack ran: "
                                  "stopping, as its services would write into it no more")
    assert not folder.path.exists()
