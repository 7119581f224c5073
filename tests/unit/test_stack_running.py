"""``plantml stack list`` and ``stack down`` over stacks that run now: real processes holding their folders'
locks as a stack's process does (without services), records where every stack keeps them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plantml.cli import main
from plantml.stack.folder import LOCK, PRUNING
from plantml.stack.running import lock_holder, running_stacks

HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, (str(os.getpid()) + sys.argv[2]).encode())
    print("locked", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def stacks(tmp_path, monkeypatch):
    """Start a stand-in stack process on a folder, recorded as a stack records itself; all ended after."""
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    started: list[subprocess.Popen] = []

    def start(name: str, env_file: Path | None = None, written: str = "") -> subprocess.Popen:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "state.json").write_text(json.dumps({"ports": {"mlflow": {"mlflow": 5999}}}))
        records = tmp_path / "cache" / "stacks"
        records.mkdir(parents=True, exist_ok=True, mode=0o700)
        entry = {"folder": str(folder), "temporary": False, **({"env_file": str(env_file)} if env_file else {})}
        (records / f"{name}.json").write_text(json.dumps(entry))
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), written], stdout=subprocess.PIPE, text=True)
        started.append(holder)
        assert holder.stdout.readline() == "locked\n"
        return holder

    yield start
    for holder in started:
        holder.kill()
        holder.wait()


def test_running_stacks_are_listed_and_one_named_is_stopped(stacks, tmp_path, capsys) -> None:
    first = stacks("first", env_file=tmp_path / "first.env")
    second = stacks("second")
    third = stacks("third")
    stacks("pruned", written=f" {PRUNING}")  # a prune ending a dead stack's services: no stack runs there

    assert [(s.pid, s.folder.name, s.tracking_uri) for s in running_stacks()] == [
        (first.pid, "first", "http://127.0.0.1:5999"), (second.pid, "second", "http://127.0.0.1:5999"),
        (third.pid, "third", "http://127.0.0.1:5999")]
    assert main(["stack", "list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "PID", str(first.pid), str(second.pid), str(third.pid)]

    assert main(["stack", "down", "--data-dir", str(tmp_path / "first" / ".." / "third")]) == 0  # any spelling of it
    assert capsys.readouterr().out == f"stopped the stack of pid {third.pid} (data folder {tmp_path / 'third'})\n"
    assert third.wait(timeout=10) == -15 and first.poll() is None and second.poll() is None
    assert main(["stack", "down", "--data-dir", str(tmp_path / "third")]) == 0
    assert capsys.readouterr().out == f"no plantml stack runs on {tmp_path / 'third'}: nothing to stop\n"

    assert main(["stack", "down"]) == 2  # two run: which one?
    assert "2 stacks run now" in capsys.readouterr().err and first.poll() is None and second.poll() is None

    assert main(["stack", "down", "--env-file", str(tmp_path / "first.env")]) == 0
    assert capsys.readouterr().out == f"stopped the stack of pid {first.pid} (data folder {tmp_path / 'first'})\n"
    assert first.wait(timeout=10) == -15 and lock_holder(tmp_path / "first") is None
    assert second.poll() is None  # left alone

    assert main(["stack", "down"]) == 0  # the only one left
    assert second.wait(timeout=10) == -15
    assert main(["stack", "down"]) == 0 and "no plantml stack runs now: nothing to stop" in capsys.readouterr().out


def test_a_dead_stacks_lock_file_naming_a_live_pid_is_no_running_stack(tmp_path, monkeypatch) -> None:
    """The pid a dead stack wrote may be another process's now: only a lock the kernel holds counts."""
    (tmp_path / LOCK).write_text(str(__import__("os").getpid()))
    assert lock_holder(tmp_path) is None
