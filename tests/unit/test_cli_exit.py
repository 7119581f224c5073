"""The command line's exit skips Python's teardown of every module (seconds of CPU after torch, torchvision
and MLflow), and still does what an exit must: threads shut down and waited for, exit handlers run, streams
flushed, the exit code kept. A ``sitecustomize`` on ``PYTHONPATH`` plays the code a command loads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SITE = textwrap.dedent("""
    import atexit, concurrent.futures, os, threading, time

    done = os.environ["EXIT_PROBE"]

    def handler():
        with open(done, "a") as out:
            out.write("atexit ran\\n")
        print("goodbye from an exit handler")  # buffered on a pipe: only a flush after the handlers shows it

    atexit.register(handler)
    idle = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # a pool nobody shut down: its worker waits for work
    idle.submit(lambda: None).result()

    def late():
        time.sleep(1)
        with open(done, "a") as out:
            out.write("thread ended\\n")

    threading.Thread(target=late).start()  # a thread that keeps the process alive until it ends
""")


@pytest.mark.parametrize("args, code", [(["data", "synth", "{set}", "--per-class", "3", "--size", "16"], 0),
                                        (["data", "inspect", "{set}/nothing"], 2)], ids=["success", "failure"])
def test_the_exit_runs_threads_and_handlers_to_their_end_flushes_and_keeps_the_code(tmp_path: Path, args, code) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE)
    probe = tmp_path / "probe.txt"
    args = [arg.format(set=tmp_path / "set") for arg in args]
    done = subprocess.run([sys.executable, "-m", "plantml", *args], capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # tox sets it
                               "PYTHONPATH": str(tmp_path / "site"), "EXIT_PROBE": str(probe)})
    assert done.returncode == code, done.stderr
    assert probe.read_text() == "thread ended\natexit ran\n"  # Python's order: threads first, then the handlers
    assert done.stdout.endswith("goodbye from an exit handler\n")
    if code == 0:
        assert done.stdout.startswith(f"{tmp_path / 'set'}: 6 images")
    else:
        assert done.stderr == f"plantml: error: data folder {tmp_path / 'set' / 'nothing'}: not found\n"
