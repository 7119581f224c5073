"""A service's pid file left by a server killed with the machine: removed only when its pid is another process
and nothing works in the folder any more (what PostgreSQL's own checks cannot tell after a reboot)."""

from __future__ import annotations

import subprocess

import pytest

from plantml.stack.host import remove_stale_pid_file
from plantml.stack.service import ServiceSpec


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "data").mkdir()
    return ServiceSpec(name="postgres", command=("postgres",), folder=tmp_path, port=1, ready=lambda: True,
                       pid_file="data/postmaster.pid")


@pytest.fixture
def sleeper():
    started = []

    def start(cwd: str = "/") -> subprocess.Popen:
        started.append(subprocess.Popen(["sleep", "300"], cwd=cwd))
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_a_pid_file_naming_another_process_is_removed_and_that_process_left_alone(spec, sleeper):
    other = sleeper()
    pid_file = spec.folder / "data" / "postmaster.pid"
    pid_file.write_text(f"{other.pid}\n{spec.folder / 'data'}\n")

    remove_stale_pid_file(spec)

    assert not pid_file.exists()
    assert other.poll() is None


def test_a_pid_file_stays_while_a_process_works_in_the_folder(spec, sleeper):
    """An orphan of a killed server (or the server itself): PostgreSQL must see its file and refuse to start."""
    other = sleeper()
    sleeper(cwd=str(spec.folder / "data"))
    pid_file = spec.folder / "data" / "postmaster.pid"
    pid_file.write_text(f"{other.pid}\n")

    remove_stale_pid_file(spec)

    assert pid_file.exists()


def test_a_pid_file_naming_no_process_is_left_to_the_program(spec):
    pid_file = spec.folder / "data" / "postmaster.pid"
    pid_file.write_text("4194304\n")  # above any pid_max: no such process

    remove_stale_pid_file(spec)

    assert pid_file.exists()
