"""``torchrun --nnodes 2``, the README's two-machine command, with each machine played by a folder of its own.

Each node runs in its own working folder with its own cache and journal folders and its own HOME; only node 0
has tracking settings (a local store in its folder). What differs between machines is what this exercises: each
machine makes its own copy of the synthetic set (its local rank 0 does), the ranks agree that the copies hold
the same images, and node 1, which has no tracking settings at all, creates no run, no store and no file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import port_for

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TRAIN = ["-m", "plantml", "train", "--epochs", "1", "--batch-size", "64", "--image-size", "16", "--weights", "none",
         "--num-workers", "0", "--run-name", "two_machines"]


def test_two_machines_make_one_run_each_with_its_own_copy_of_the_synthetic_set(tmp_path: Path) -> None:
    port = port_for.select_random()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PLANTML_", "MLFLOW_", "AWS_"))}
    nodes = []
    for rank in (0, 1):
        machine = tmp_path / f"machine{rank}"
        (machine / "work").mkdir(parents=True)
        env = {**clean, "HOME": str(machine), "PLANTML_CACHE_DIR": str(machine / "cache"),
               "PLANTML_JOURNAL_DIR": str(machine / "journal"), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        if rank == 0:
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{machine / 'work' / 'mlflow.db'}"
        nodes.append(subprocess.Popen(
            [TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc_per_node", "1", "--master-addr", "127.0.0.1",
             "--master-port", str(port), *TRAIN], cwd=machine / "work", env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    (out0, err0), (out1, err1) = (node.communicate(timeout=300) for node in nodes)

    assert nodes[0].returncode == 0, err0[-3000:]
    assert nodes[1].returncode == 0, err1[-3000:]
    assert (out1, err1) == ("", "")  # only rank 0 prints
    assert "x 2 processes (gloo, 128 images per step)" in err0 and out0.count("best epoch") == 1
    sets = [sorted(p.name for p in (tmp_path / f"machine{rank}" / "cache").iterdir() if p.name != "scans") for rank in (0, 1)]
    assert sets[0] == sets[1] and sets[0][0].startswith("synthetic-leaves-")  # each machine drew its own copy
    assert list((tmp_path / "machine1" / "work").iterdir()) == []  # no store, no output, no journal on node 1
    assert not (tmp_path / "machine1" / "journal").exists()

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'machine0' / 'work' / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.info.run_name == "two_machines"
    assert (run.data.params["world_size"], run.data.params["global_batch_size"]) == ("2", "128")
    assert run.data.tags["distributed_backend"] == "gloo"
