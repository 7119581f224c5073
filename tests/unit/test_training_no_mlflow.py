"""``--no-mlflow`` trains without importing mlflow or sending a single request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

from plantml.training import synth

SCRIPT = """
import json, sys
from plantml.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "mlflow_imported": any(m == "mlflow" or m.startswith("mlflow.") for m in sys.modules)}))
"""


def test_no_mlflow_makes_no_request_and_imports_no_mlflow(tmp_path):
    leaves = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=12, size=32, seed=0))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    connections = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                connections.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
           "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, "train", "--no-mlflow", "--data-dir", str(leaves), "--epochs", "1",
             "--batch-size", "8", "--image-size", "32", "--weights", "none", "--num-workers", "0"],
            env=env, capture_output=True, text=True, timeout=300,
        )
    finally:
        stop.set()
        thread.join()
        listener.close()

    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "mlflow_imported": False}, out.stderr
    assert connections == []
