"""Short CPU training runs against the real stack, read back with plain MLflow and boto3.

One run per backbone (tiny images, two epochs, a few dozen images); each test reads the
params, the per-epoch metrics, the artifacts in the bucket and the registered version,
then loads that version with ``mlflow.pytorch.load_model`` in a fresh process to predict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from urllib.parse import urlparse

import pytest

from plantml.cli import main
from plantml.training import synth

BACKBONES = ["resnet18", "resnet50", "efficientnet_b0", "mobilenet_v2"]
EPOCH_METRICS = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate"]
DESIGN_PARAMS = [
    "backbone", "epochs", "batch_size", "learning_rate", "device", "freeze_backbone", "unfreeze_epoch",
    "early_stopping_patience", "optimizer", "scheduler", "loss_function", "num_classes", "train_size", "val_size",
    "test_size", "total_parameters", "trainable_parameters",
]
RUN_ARTIFACTS = ["training/training_history.json", "models/best_model.pth", "figures/learning_curves.png",
                 "figures/confusion_matrix.png"]

LOAD_AND_PREDICT = """
import json, sys
import mlflow.pytorch, torch
model = mlflow.pytorch.load_model(sys.argv[1])
with torch.no_grad():
    out = model(torch.randn(3, 3, 32, 32))
print(json.dumps({"shape": list(out.shape)}))
"""


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=20, size=32, seed=0))


def train_cli(*args: str) -> int:
    return main(["train", "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--weights", "none",
                 "--num-workers", "0", *args])


def only_run(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    [run] = client.search_runs([experiment.experiment_id])
    return run


def s3_keys(s3, uri: str) -> list[str]:
    parsed = urlparse(uri)
    prefix = parsed.path.lstrip("/")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=parsed.netloc, Prefix=prefix)
    return [obj["Key"][len(prefix):].lstrip("/") for page in pages for obj in page.get("Contents", [])]


# Every backbone on the local session; one on containers, whose subject is the stack (the backbone is the client's).
@pytest.mark.parametrize("backbone", [BACKBONES[0], *(pytest.param(b, marks=pytest.mark.local_session) for b in BACKBONES[1:])])
def test_tracked_run_records_everything_and_registers_a_loadable_model(
        backbone, leaves, mlflow_env, mlflow_client, s3_client, experiment_name, capsys):
    assert train_cli("--backbone", backbone, "--data-dir", str(leaves), "--experiment-name", experiment_name,
                     "--run-name", f"{backbone}_it") == 0
    run = only_run(mlflow_client, experiment_name)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == f"{backbone}_it"

    # params: the design's list plus seed, weights, image_size, and the system facts
    params = run.data.params
    assert set(DESIGN_PARAMS + ["seed", "weights", "image_size"]) <= set(params)
    assert params["backbone"] == backbone and params["epochs"] == "2" and params["device"] == "cpu"
    assert (params["train_size"], params["val_size"], params["test_size"]) == ("28", "6", "6")
    assert params["num_classes"] == "2" and params["weights"] == "none" and params["image_size"] == "32"
    assert int(params["trainable_parameters"]) == int(params["total_parameters"]) > 0
    assert {"python_version", "cpu_count", "memory_gb"} <= set(params)

    # metrics: five per epoch, the test pair at the end
    for key in EPOCH_METRICS:
        assert [m.step for m in mlflow_client.get_metric_history(run_id, key)] == [1, 2], key
    assert {"test_loss", "test_accuracy"} <= set(run.data.metrics)

    # tags: data set and its hash, framework, best epoch, code version
    tags = run.data.tags
    assert tags["framework"] == "pytorch" and tags["dataset"] == "leaves" and tags["dataset_synthetic"] == "true"
    assert len(tags["dataset_hash"]) == 64
    assert tags["best_epoch"] in ("1", "2") and 0 <= float(tags["best_val_accuracy"]) <= 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    assert tags.get("git_commit") == (head.stdout.strip() if head.returncode == 0 else None)  # the folder it ran in
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             check=False)
    assert tags.get("git_dirty") == (str(bool(changed.stdout.strip())).lower() if head.returncode == 0 else None)

    # artifacts, read from the bucket itself
    keys = s3_keys(s3_client, run.info.artifact_uri)
    assert set(RUN_ARTIFACTS) <= set(keys), keys
    history_key = urlparse(run.info.artifact_uri).path.lstrip("/") + "/training/training_history.json"
    history = json.loads(s3_client.get_object(Bucket=mlflow_env.bucket, Key=history_key)["Body"].read())
    assert history["epoch"] == [1, 2] and history["best_epoch"] == int(tags["best_epoch"])

    # the registered version, its logged model in the bucket, and a prediction from a fresh process
    name = f"{backbone}_plant_classifier"
    [version] = mlflow_client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    assert tags["registered_model_version"] == version.version
    assert mlflow_client.get_model_version(name, version.version).status == "READY"
    model_id = version.model_id or version.source.removeprefix("models:/").split("/")[0]
    logged = mlflow_client.get_logged_model(model_id)
    assert logged.source_run_id == run_id
    model_keys = s3_keys(s3_client, logged.artifact_location)
    assert "MLmodel" in model_keys and any(k.startswith("data/") for k in model_keys), model_keys
    out = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, f"models:/{name}/{version.version}"],
                         env={**os.environ, **mlflow_env.client_env()}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"shape": [3, 2]}


@pytest.mark.local_session  # the client's: the containers session would only repeat it, slower
def test_default_command_trains_on_the_cached_synthetic_set(mlflow_env, mlflow_client, experiment_name,
                                                            tmp_path, monkeypatch):
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "--epochs", "1", "--experiment-name", experiment_name, "--no-register"]) == 0

    run = only_run(mlflow_client, experiment_name)
    assert run.data.tags["dataset_synthetic"] == "true"
    assert run.data.tags["dataset"].startswith("synthetic-leaves-200x2-96px")
    assert (run.data.params["train_size"], run.data.params["val_size"], run.data.params["test_size"]) == ("280", "60", "60")
    assert run.data.params["image_size"] == "64"
    [dataset_input] = run.inputs.dataset_inputs  # the synthetic set is a run's input like any other
    assert dataset_input.dataset.name == run.data.tags["dataset"] and dataset_input.dataset.source_type == "synthetic"
    assert dataset_input.dataset.digest == run.data.tags["dataset_hash"][:32]
    assert json.loads(dataset_input.dataset.profile)["content_sha256"] == run.data.tags["dataset_hash"]


@pytest.mark.parametrize("raised, status", [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_interrupted_or_failed_run_does_not_stay_running(raised, status, leaves, mlflow_env, mlflow_client,
                                                         experiment_name):
    from plantml.tracking import MLflowTracker
    from plantml.training.config import Reporter, TrainConfig
    from plantml.training.run import train

    class Stop(Reporter):
        def epoch_end(self, record):
            raise raised("stop")

    tracker = MLflowTracker(experiment_name=experiment_name)
    config = TrainConfig(data_dir=leaves, epochs=2, batch_size=8, image_size=32, weights="none", num_workers=0)
    with pytest.raises(raised):
        train(config, tracker, Stop())

    run = only_run(mlflow_client, experiment_name)
    assert run.info.status == status
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "val_loss")] == [1]


def test_bad_input_creates_no_run(mlflow_env, mlflow_client, experiment_name, leaves):
    assert train_cli("--data-dir", str(leaves), "--experiment-name", experiment_name,
                     "--freeze-backbone", "--unfreeze-epoch", "9") == 2

    assert mlflow_client.get_experiment_by_name(experiment_name) is None


@pytest.mark.local_session
def test_a_client_with_only_the_tracking_uri_trains_on_a_proxied_stack_and_is_stopped_before_training_on_a_direct_one(
        mlflow_stack_any_mode, leaves, tmp_path, experiment_name):
    """Proxied: the server stores the artifacts, so MLFLOW_TRACKING_URI is all a client needs. Direct: the client
    uploads them itself, so without keys it is told at once, in one line, before any run or training."""
    import mlflow

    stack = mlflow_stack_any_mode
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "MLFLOW_", "BOTO"))}
    env.update(MLFLOW_TRACKING_URI=stack.tracking_uri, HOME=str(tmp_path), PLANTML_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "plantml", "train", "--epochs", "1", "--batch-size", "8", "--image-size",
                          "16", "--weights", "none", "--num-workers", "0", "--data-dir", str(leaves),
                          "--experiment-name", experiment_name],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    client = mlflow.MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    if stack.artifact_mode == "proxied":
        assert out.returncode == 0, out.stderr[-3000:]
        assert [run.info.status for run in runs] == ["FINISHED"]
        [version] = client.search_model_versions(f"name='resnet18_plant_classifier' and run_id='{runs[0].info.run_id}'")
        assert version.status == "READY"
    else:
        assert out.returncode == 2, out.stderr[-3000:]
        assert out.stderr.strip().splitlines()[-1].startswith(
            f"plantml: error: experiment {experiment_name!r} keeps its artifacts at s3://")
        assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in out.stderr and "epoch 1/1" not in out.stdout
        assert runs == []


@pytest.mark.local_session
def test_keys_in_boto3s_credentials_file_count_for_a_direct_stack(mlflow_stack, tmp_path, monkeypatch, experiment_name):
    from plantml.errors import ConfigError
    from plantml.tracking import MLflowTracker

    for name in [name for name in os.environ if name.startswith(("AWS_", "MLFLOW_", "BOTO"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no .env here
    tracker = MLflowTracker(mlflow_stack.tracking_uri, experiment_name, journal_dir=tmp_path / "journal")
    with pytest.raises(ConfigError):
        tracker.check_artifact_access()
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = {mlflow_stack.aws_access_key}\naws_secret_access_key = {mlflow_stack.aws_secret_key}\n")
    tracker.check_artifact_access()  # found: no error


@pytest.mark.local_session
def test_keys_the_object_store_refuses_or_a_missing_bucket_are_one_line_before_any_work(mlflow_stack, tmp_path, monkeypatch,
                                                                                       experiment_name):
    """Was: accepted, then every upload refused (SignatureDoesNotMatch) until the run's end, marked FAILED."""
    import mlflow

    from plantml.errors import ConfigError
    from plantml.tracking import MLflowTracker

    monkeypatch.chdir(tmp_path)
    stack = mlflow_stack
    wrong = MLflowTracker(stack.tracking_uri, experiment_name, s3_endpoint=stack.s3_endpoint, aws_access_key=stack.aws_access_key,
                          aws_secret_key="wrong-secret", journal_dir=tmp_path / "journal")
    with pytest.raises(ConfigError, match=rf"^object store {stack.s3_endpoint} .* refuses this client's keys "
                                          rf"\(SignatureDoesNotMatch: AWS_ACCESS_KEY_ID '{stack.aws_access_key}', from argument\)"):
        wrong.check_artifact_access()
    unknown = MLflowTracker(stack.tracking_uri, experiment_name, s3_endpoint=stack.s3_endpoint, aws_access_key="nobody",
                            aws_secret_key=stack.aws_secret_key, journal_dir=tmp_path / "journal")
    with pytest.raises(ConfigError, match=r"refuses this client's keys \(InvalidAccessKeyId: AWS_ACCESS_KEY_ID 'nobody', "):
        unknown.check_artifact_access()

    mlflow.MlflowClient(stack.tracking_uri).create_experiment(f"{experiment_name}-nb", artifact_location="s3://no-such-bucket/a")
    elsewhere = MLflowTracker(stack.tracking_uri, f"{experiment_name}-nb", s3_endpoint=stack.s3_endpoint,
                              aws_access_key=stack.aws_access_key, aws_secret_key=stack.aws_secret_key,
                              journal_dir=tmp_path / "journal")
    with pytest.raises(ConfigError, match=r"has no bucket 'no-such-bucket' for the artifacts at s3://no-such-bucket/a"):
        elsewhere.check_artifact_access()


@pytest.mark.local_session  # the client's: the containers session would only repeat it, slower
def test_a_registering_training_prints_its_own_lines_and_none_of_mlflows(leaves, mlflow_env, experiment_name, tmp_path):
    """MLflow's client logged "Waiting up to 300 seconds for model version to finish creation" into every
    training that registered its model on a server."""
    done = subprocess.run([sys.executable, "-m", "plantml", "train", "--epochs", "1", "--image-size", "32", "--weights",
                           "none", "--num-workers", "0", "--data-dir", str(leaves), "--experiment-name", experiment_name,
                           "--registered-model-name", f"{experiment_name[-20:]}_quiet"],
                          env={**os.environ, **mlflow_env.client_env(), "PLANTML_JOURNAL_DIR": str(tmp_path / "journal")},
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-2000:]
    assert f"registered {experiment_name[-20:]}_quiet version 1" in done.stderr.splitlines()
    assert [line for line in done.stdout.splitlines() + done.stderr.splitlines() if "mlflow." in line] == []
