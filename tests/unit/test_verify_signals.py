"""``plantml verify`` stopped by SIGTERM or SIGHUP mid-check: one line, 128 + the signal, its run ended."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

# plantml verify in a child whose params check waits (long enough for the signal to land there).
SLOW_VERIFY = """
import sys, time
from plantml.verification.runner import Verification
Verification.check_params = lambda self: time.sleep(60)
from plantml.cli import main
sys.exit(main(["verify", "--tracking-uri", sys.argv[1], "--experiment-name", "verify_signals"]))
"""


def test_sigterm_during_verify_ends_its_run_and_exits_143(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()  # the store exists, as after a first training
    child = subprocess.Popen([sys.executable, "-c", SLOW_VERIFY, uri], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.startswith("✓ Test run started"):
                break
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1].startswith("plantml: interrupted by SIGTERM")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("verify_signals").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
