"""``plantml ui`` end to end: a local store with a run, the printed URL opened in headless
Chromium shows that run in the model-training view, and Ctrl-C frees the port.

It needs no stack (it serves the default local store), so it is collected in the
local-backend session only (see conftest.py). Chromium comes from Debian's ``chromium``
package, which ``.ci/run`` installs; without it the test fails, it is not skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _files import snapshot

from plantml.datasets import build_manifest
from plantml.training import synth

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """A server can bind ``port`` again, as servers bind (SO_REUSEADDR: uvicorn, PostgreSQL, weed): refused while
    anything listens there; not by what the kernel keeps of closed connections (TIME_WAIT, FIN_WAIT), which made a
    plain bind fail for a few seconds after the browser's connections (CI, once)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def rendered_page(url: str, profile: Path) -> str:
    """The DOM of ``url`` after Chromium ran its scripts (the UI is a single-page app that fetches the run)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("headless Chromium is needed for this test: apt-get install -y chromium")
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def store_with_a_run(tmp_path: Path) -> tuple[Path, str, str]:
    """A folder whose default local store holds one run of ``plantml train`` on the set ``ui_leaves``:
    (folder, run name, run id)."""
    leaves = synth.generate(tmp_path / "ui_leaves", synth.SynthSpec(per_class=6, size=32, seed=1))
    folder = tmp_path / "project"
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    run_name = "ui_visible_run"
    done = subprocess.run(
        [sys.executable, "-m", "plantml", "train", "--epochs", "1", "--batch-size", "8", "--image-size", "16",
         "--weights", "none", "--num-workers", "0", "--no-register", "--data-dir", str(leaves), "--run-name", run_name],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "see the run: `plantml ui` in this folder" in done.stdout
    run_id = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("run "))
    return folder, run_name, run_id


@contextlib.contextmanager
def plantml_ui(folder: Path, port: int) -> Iterator[subprocess.Popen]:
    """``plantml ui`` on ``folder``'s store, in a session of its own, without the stack's variables;
    killed with its server if the test leaves it running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    ui = subprocess.Popen([sys.executable, "-m", "plantml", "ui", "--port", str(port)], cwd=folder, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield ui
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()


def test_plantml_ui_shows_the_newest_run_and_ctrl_c_frees_the_port(store_with_a_run: tuple[Path, str, str], tmp_path: Path) -> None:
    folder, run_name, run_id = store_with_a_run
    port = free_port()
    before = snapshot(folder)
    with plantml_ui(folder, port) as ui:
        started = time.monotonic()
        first = ui.stdout.readline()
        ready_s = time.monotonic() - started
        assert first.startswith("MLflow UI for sqlite:///mlflow.db: "), first + ui.stderr.read()
        url = first.split(": ", 1)[1].strip()
        assert url == f"http://127.0.0.1:{port}/#/experiments/1/runs/{run_id}?workflowType=machine_learning"
        assert ready_s < 60

        page = rendered_page(url, tmp_path / "chromium")
        assert run_name in page and run_id in page
        # The run's dataset input: the set's name and (MLflow's 32 characters of) its content digest.
        digest = build_manifest(store_with_a_run[0].parent / "ui_leaves").digest
        assert f"ui_leaves ({digest[:32]})" in page
        # The model-training view's sidebar has the model registry; the GenAI view's has judges and a playground.
        assert "Model registry" in page and "Playground" not in page and "Judges" not in page

        os.killpg(ui.pid, signal.SIGINT)
        assert ui.wait(timeout=30) == 0
        assert "plantml ui: stopped" in ui.stderr.read()
    assert port_is_free(port)
    assert snapshot(folder) == before  # not a file added, changed or touched (the store's database included)


def empty_store(folder: Path) -> Path:
    """``folder`` with a default local store holding no run: enough for ``plantml ui`` to serve."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM], ids=["closed terminal", "SIGTERM"])
def test_a_closed_terminal_or_sigterm_stops_plantml_ui_and_its_server(tmp_path: Path, signum: int) -> None:
    port = free_port()
    with plantml_ui(empty_store(tmp_path), port) as ui:
        assert ui.stdout.readline().startswith("MLflow UI for "), ui.stderr.read()
        ui.send_signal(signum)  # to plantml ui alone, as a closing terminal signals its session's leader
        assert ui.wait(timeout=30) == 0
        assert "plantml ui: stopped" in ui.stderr.read()
    assert port_is_free(port)  # the mlflow server went with it, not left behind as an orphan


def test_kill_9_of_plantml_ui_takes_its_server_with_it(tmp_path: Path) -> None:
    port = free_port()
    with plantml_ui(empty_store(tmp_path), port) as ui:
        assert ui.stdout.readline().startswith("MLflow UI for "), ui.stderr.read()
        server_pid = int(Path(f"/proc/{ui.pid}/task/{ui.pid}/children").read_text().split()[0])
        assert not Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()  # MLflow's server: one process
        ui.kill()  # what the OOM killer does: no handler runs
        ui.wait(timeout=30)
        try:
            deadline = time.monotonic() + 15
            while not port_is_free(port) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert port_is_free(port)  # the kernel stopped the server (--pdeathsig), and it its workers
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server_pid, signal.SIGKILL)  # its own session (mirakuru's): an orphan the test must not leave
