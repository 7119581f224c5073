"""The README's Python tracking example, run as written in a fresh interpreter, in a folder of its own with no
tracking settings: what it logs must be in the local store it falls back to (``./mlflow.db``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[2] / "README.md"


def test_the_readmes_tracker_example_runs_as_written_and_stores_what_it_logs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(import torch\nfrom plantml import MLflowTracker\n.*?)```", README.read_text("utf-8"),
                        re.DOTALL)
    assert len(blocks) == 1, "the README's MLflowTracker example moved: update this test"
    (tmp_path / "example.py").write_text(blocks[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["PLANTML_JOURNAL_DIR"] = str(tmp_path / "journal")

    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)

    assert done.returncode == 0 and done.stderr == "", done.stderr
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("plant_classification").experiment_id])
    assert done.stdout == f"{run.info.run_id} 0.75\n"
    assert run.info.status == "FINISHED" and run.info.run_name == "resnet18_baseline"
    assert run.data.params == {"backbone": "resnet18", "learning_rate": "0.001", "epochs": "3"}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3]
    assert run.data.tags["model"] == "resnet18"
    assert "classes.json" in [f.path for f in client.list_artifacts(run.info.run_id)]
    [version] = client.search_model_versions("name='plant_classifier'")
    assert version.run_id == run.info.run_id
    assert int(version.version) == 1  # registered models load as modules: test_models_usable.py
