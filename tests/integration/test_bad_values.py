"""A bad value never blocks the rest: refused at the call (or made safe), the good data arrives, the run ends FINISHED.

What MLflow's stores cannot hold (a NUL character, a step beyond int64, a number beyond a
float) is refused with a one-line error naming it; a lone surrogate (a file name that
is not UTF-8) is written as its bytes. Then real ``plantml train`` runs on a data folder
named in Latin-1 and on one holding a truncated JPEG.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plantml.errors import ValidationError
from plantml.tracking import MLflowTracker
from plantml.training import synth

BAD_CALLS = [
    ("nul_in_a_param", lambda t: t.log_param("data_dir", "/data/a\x00b"), "param 'data_dir'"),
    ("nul_in_a_tag", lambda t: t.set_tag("note", "a\x00b"), "tag 'note'"),
    ("step_beyond_int64", lambda t: t.log_metric("loss", 0.5, step=2**63), "step 9223372036854775808"),
    ("number_beyond_a_float", lambda t: t.log_metric("loss", 10**400, step=1), "metric 'loss'"),
]


@pytest.fixture
def tracker(mlflow_env, experiment_name, tmp_path):
    tracker = MLflowTracker(experiment_name=experiment_name, journal_dir=tmp_path / "journal")
    yield tracker
    tracker.end_run()


@pytest.mark.parametrize("call, names", [case[1:] for case in BAD_CALLS], ids=[case[0] for case in BAD_CALLS])
def test_a_value_mlflow_cannot_store_is_refused_and_the_rest_arrives(call, names, tracker, mlflow_client):
    with tracker.start_run() as run:
        tracker.log_params({"lr": 0.01})
        tracker.log_metric("loss", 1.0, step=0)
        with pytest.raises(ValidationError) as refused:
            call(tracker)
        tracker.log_metric("loss", 0.25, step=2)
        tracker.set_tag("stage", "done")
    assert names in str(refused.value) and "\n" not in str(refused.value)
    stored = mlflow_client.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"lr": "0.01"} and stored.data.tags["stage"] == "done"
    assert [(m.step, m.value) for m in mlflow_client.get_metric_history(run.run_id, "loss")] == [(0, 1.0), (2, 0.25)]
    assert "plantml.rejected" not in stored.data.tags


def test_a_name_that_is_not_utf8_is_stored_as_its_bytes(tracker, mlflow_client, tmp_path):
    latin1 = os.fsdecode(b"/data/pl\xe9nts")  # what Python makes of a Latin-1 folder name
    source = Path(os.fsdecode(bytes(tmp_path) + b"/r\xe9sum\xe9.txt"))
    source.write_text("notes")
    with tracker.start_run(run_name=os.fsdecode(b"run-\xe9")) as run:
        tracker.log_params({"data_dir": latin1})
        tracker.set_tags({"dataset_path": latin1})
        tracker.log_artifact(source, artifact_path="notes")
    stored = mlflow_client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "run-%E9"
    assert stored.data.params["data_dir"] == "/data/pl%E9nts" and stored.data.tags["dataset_path"] == "/data/pl%E9nts"
    assert [f.path for f in mlflow_client.list_artifacts(run.run_id, "notes")] == ["notes/r%E9sum%E9.txt"]


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=20, size=24, seed=0))


def train(data_dir: bytes | str, experiment_name: str, env_stack, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "plantml", "train", "--epochs", "2", "--batch-size", "8", "--image-size", "16",
               "--weights", "none", "--num-workers", "0", "--no-register", "--experiment-name", experiment_name,
               "--data-dir", data_dir, *extra]
    env = {**os.environ, **env_stack.client_env(), "PLANTML_JOURNAL_DIR": str(tmp_path / "journal")}
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=600)


def only_run(client, experiment_name):
    [run] = client.search_runs([client.get_experiment_by_name(experiment_name).experiment_id])
    return run


def test_training_on_a_folder_named_in_latin1_finishes_with_everything(leaves, mlflow_env, mlflow_client, experiment_name,
                                                                       tmp_path):
    folder = bytes(tmp_path) + b"/pl\xe9nts"
    shutil.copytree(leaves, os.fsdecode(folder))
    os.rename(os.fsdecode(folder + b"/healthy"), os.fsdecode(folder + b"/sain\xe9"))  # a class named in Latin-1 too

    result = train(folder, experiment_name, mlflow_env, tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    run = only_run(mlflow_client, experiment_name)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "pl%E9nts" and run.data.tags["dataset_classes"] == "diseased,sain%E9"
    # the dataset input and the history artifact say the same, in JSON every UTF-8 reader decodes (not "\\udce9")
    [dataset] = [entry.dataset for entry in run.inputs.dataset_inputs]
    assert json.loads(dataset.profile)["classes"] == ["diseased", "sain%E9"]
    assert json.loads(dataset.source)["path"] == os.fsdecode(folder).replace("\udce9", "%E9")
    history = Path(mlflow_client.download_artifacts(run.info.run_id, "training/training_history.json", str(tmp_path)))
    assert json.loads(history.read_text(encoding="utf-8"))["classes"] == ["diseased", "sain%E9"]
    assert b"\\udc" not in dataset.profile.encode() + dataset.source.encode() + history.read_bytes()
    assert run.data.params["train_size"] == "28" and run.data.params["skipped_images"] == "0"
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    artifacts = {f.path for f in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"training", "models", "figures"} <= artifacts
    assert len(mlflow_client.search_logged_models([run.info.experiment_id])) == 1


def test_a_truncated_jpeg_is_skipped_and_counted_with_skip_bad_images(leaves, mlflow_stack, mlflow_client, experiment_name,
                                                                       tmp_path):
    folder = tmp_path / "leaves"
    shutil.copytree(leaves, folder)
    from PIL import Image

    Image.new("RGB", (64, 64), (40, 140, 40)).save(folder / "healthy" / "cut.jpg", quality=95)
    data = (folder / "healthy" / "cut.jpg").read_bytes()
    (folder / "healthy" / "cut.jpg").write_bytes(data[: len(data) // 2])

    refused = train(str(folder), experiment_name, mlflow_stack, tmp_path)
    err = refused.stderr.decode()
    assert refused.returncode == 2 and f"image {folder / 'healthy' / 'cut.jpg'}: cannot be decoded" in err
    assert "Traceback" not in err and mlflow_client.get_experiment_by_name(experiment_name) is None  # no run was made

    skipped = train(str(folder), experiment_name, mlflow_stack, tmp_path, "--skip-bad-images")
    assert skipped.returncode == 0, skipped.stderr.decode()[-3000:]
    run = only_run(mlflow_client, experiment_name)
    assert run.info.status == "FINISHED" and run.data.params["skipped_images"] == "1"
