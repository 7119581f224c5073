"""Every MLflowTracker method against the real stack, in both artifact modes.

Results are read back with a plain ``MlflowClient`` and boto3, never through the tracker.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from plantml.tracking import MLflowTracker


@pytest.fixture
def stack(mlflow_stack_any_mode):
    return mlflow_stack_any_mode


@pytest.fixture
def tracker(stack, experiment_name, monkeypatch) -> MLflowTracker:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)  # the tracker must carry its own settings
    tracker = MLflowTracker(
        tracking_uri=stack.tracking_uri,
        experiment_name=experiment_name,
        s3_endpoint=stack.s3_endpoint,
        aws_access_key=stack.aws_access_key,
        aws_secret_key=stack.aws_secret_key,
    )
    yield tracker
    tracker.end_run()


@pytest.fixture
def client(stack):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=stack.tracking_uri)


def s3_objects(stack, artifact_uri: str) -> dict[str, bytes]:
    """The run's artifacts as stored in the bucket, by path relative to the artifact root."""
    prefix = urlparse(artifact_uri).path.lstrip("/")
    if artifact_uri.startswith("s3://"):
        assert urlparse(artifact_uri).netloc == stack.bucket
    s3 = stack.s3_client()
    listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix + "/").get("Contents", [])
    return {
        item["Key"][len(prefix) + 1 :]: s3.get_object(Bucket=stack.bucket, Key=item["Key"])["Body"].read()
        for item in listed
    }


def test_experiment_is_created_when_missing(tracker, client, experiment_name) -> None:
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment.experiment_id == tracker.experiment_id
    assert MLflowTracker(tracking_uri=tracker.tracking_uri, experiment_name=experiment_name).experiment_id == tracker.experiment_id


def test_start_and_end_run(tracker, client, capsys) -> None:
    run = tracker.start_run(run_name="resnet18_experiment", tags={"model": "resnet18"})
    assert client.get_run(run.run_id).info.status == "RUNNING"
    tracker.end_run(status="KILLED")
    stored = client.get_run(run.run_id)
    assert stored.info.status == "KILLED" and stored.info.run_name == "resnet18_experiment"
    assert stored.data.tags["model"] == "resnet18"
    assert stored.info.experiment_id == tracker.experiment_id
    assert capsys.readouterr().out == ""  # library code does not print


def test_failed_context_records_the_error(tracker, client) -> None:
    with pytest.raises(ValueError):
        with tracker.start_run() as run:
            raise ValueError("bad batch")
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FAILED"
    assert stored.data.tags["plantml.error.message"] == "bad batch"


def test_params_metrics_and_tags(tracker, client) -> None:
    with tracker.start_run() as run:
        tracker.log_param("learning_rate", 0.001)
        tracker.log_params({"backbone": "resnet18", "epochs": 10})
        tracker.log_metric("accuracy", 0.95, step=10)
        for epoch in range(3):
            tracker.log_training_metrics(epoch, 1.0 / (epoch + 1), 0.5 + epoch / 10, 2.0, 0.4 + epoch / 10, 0.001)
        tracker.set_tag("status", "production")
        tracker.set_tags({"best_epoch": "7", "framework": "pytorch"})
    data = client.get_run(run.run_id).data
    assert data.params == {"learning_rate": "0.001", "backbone": "resnet18", "epochs": "10"}
    assert data.tags["status"] == "production" and data.tags["best_epoch"] == "7"
    history = client.get_metric_history(run.run_id, "val_accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.4), (1, 0.5), (2, 0.6)]
    assert set(data.metrics) == {"accuracy", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate"}


def test_nan_and_infinity_are_stored_as_mlflow_stores_them(tracker, client) -> None:
    with tracker.start_run() as run, pytest.warns(UserWarning):
        tracker.log_metrics({"nan": math.nan, "inf": math.inf, "ninf": -math.inf})
    metrics = client.get_run(run.run_id).data.metrics
    assert math.isnan(metrics["nan"]) and metrics["inf"] == 1.7976931348623157e308 and metrics["ninf"] == -1.7976931348623157e308


def test_large_writes_go_out_in_chunked_batches(tracker, client) -> None:
    with tracker.start_run() as run:
        assert tracker.flush(30)
        before = tracker.requests_sent
        tracker.log_params({f"p{i}": i for i in range(250)})
        tracker.log_metrics({f"m{i}": float(i) for i in range(2500)}, step=1)
    data = client.get_run(run.run_id).data
    assert len(data.params) == 250 and len(data.metrics) == 2500
    # 250 params need 3 requests, 2500 metrics 3; the sender may pack them together
    assert 3 <= tracker.requests_sent - before - 2 <= 6  # the last two end the run (a tag, then the status)


def test_artifacts_reach_the_bucket(tracker, client, stack, tmp_path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "model.pth").write_bytes(b"\x00weights")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train.log").write_text("epoch 1\n")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    with tracker.start_run() as run:
        tracker.log_artifact(tmp_path / "model.pth", artifact_path="models")
        tracker.log_artifacts(tmp_path / "logs", artifact_path="training_logs")
        tracker.log_figure(fig, "confusion_matrix.png")
        tracker.log_dict({"val_accuracy": [0.9, 0.95]}, "training/training_history.json")
        tracker.log_text("ResNet18 summary", "model_summary.txt")
    plt.close(fig)
    objects = s3_objects(stack, client.get_run(run.run_id).info.artifact_uri)
    assert objects["models/model.pth"] == b"\x00weights"
    assert objects["training_logs/train.log"] == b"epoch 1\n"
    assert objects["confusion_matrix.png"].startswith(b"\x89PNG")
    assert json.loads(objects["training/training_history.json"]) == {"val_accuracy": [0.9, 0.95]}
    assert objects["model_summary.txt"] == b"ResNet18 summary"
    own = tracker.client  # with nothing in the environment: was public AWS's endpoint in direct mode
    assert {f.path for f in own.list_artifacts(run.run_id)} >= {"models", "confusion_matrix.png", "model_summary.txt"}
    assert Path(own.download_artifacts(run.run_id, "model_summary.txt", str(tmp_path))).read_text() == "ResNet18 summary"
    assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ  # in force for the call only
    for var, value in stack.client_env().items():
        monkeypatch.setenv(var, value)  # a plain client in direct mode reads S3 settings from here
    listed = {f.path for f in client.list_artifacts(run.run_id)}
    assert {"models", "training_logs", "training", "confusion_matrix.png", "model_summary.txt"} <= listed


def test_model_is_logged_registered_and_loads_for_any_batch(tracker, client, stack, monkeypatch) -> None:
    import mlflow.pytorch
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    name = f"clf_{tracker.experiment_id}_{stack.artifact_mode}"
    with tracker.start_run() as run:
        info = tracker.log_model(model=model, artifact_path="model", registered_model_name=name)
    assert info.registered_model_version == 1
    version = client.get_model_version(name, "1")
    assert info.model_id in (version.model_id, version.source.removeprefix("models:/"))
    assert version.run_id == run.run_id
    assert client.get_logged_model(info.model_id).source_run_id == run.run_id
    assert client.get_logged_model(info.model_id).experiment_id == tracker.experiment_id
    for var, value in stack.client_env().items():
        monkeypatch.setenv(var, value)
    for uri in (info.model_uri, f"models:/{name}/1"):
        loaded = mlflow.pytorch.load_model(uri)
        for batch in (1, 5):
            x = torch.randn(batch, 4)
            assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_system_metrics_are_facts_without_secrets(tracker, client, stack) -> None:
    with tracker.start_run() as run:
        tracker.log_system_metrics()
    params = client.get_run(run.run_id).data.params
    assert {"python_version", "platform", "cpu_count", "memory_gb"} <= set(params)
    assert int(params["cpu_count"]) >= 1 and float(params["memory_gb"]) > 0
    values = " ".join(params.values())
    assert stack.aws_secret_key not in values and stack.aws_access_key not in values


def test_search_runs_returns_flat_dicts(tracker) -> None:
    for name, accuracy in (("a", 0.85), ("b", 0.97), ("c", 0.92)):
        with tracker.start_run(run_name=name):
            tracker.log_params({"backbone": f"net_{name}"})
            tracker.log_metric("val_accuracy", accuracy)
    runs = tracker.search_runs(filter_string="metrics.val_accuracy > 0.90", max_results=5, order_by=["metrics.val_accuracy DESC"])
    assert [run["tags.mlflow.runName"] for run in runs] == ["b", "c"]
    assert runs[0]["metrics.val_accuracy"] == 0.97 and runs[0]["params.backbone"] == "net_b"
    assert {"run_id", "experiment_id", "status", "start_time", "end_time", "artifact_uri"} <= set(runs[0])
    best = tracker.get_best_run(metric="val_accuracy", ascending=False)
    assert best["tags.mlflow.runName"] == "b"
    assert tracker.get_best_run(metric="val_accuracy", ascending=True)["tags.mlflow.runName"] == "a"


DIES_AFTER_LOGGING = """
import pathlib, sys
from plantml.tracking import MLflowTracker
tracker = MLflowTracker(experiment_name=sys.argv[1], journal_dir=sys.argv[2], delivery_timeout=60, recover_timeout=0)
tracker.start_run()
artifact = pathlib.Path(sys.argv[2]).parent / "notes.txt"
artifact.write_text("logged just before the end")
tracker.log_artifact(artifact)
print(tracker.run_id, flush=True)
raise RuntimeError("the script died")  # no end_run: the run is ended at exit
"""


def test_an_artifact_logged_just_before_a_script_dies_is_delivered_at_exit(mlflow_stack, experiment_name, tmp_path) -> None:
    import mlflow

    journals = tmp_path / "journal"
    env = {**os.environ, **mlflow_stack.client_env()}
    started = time.monotonic()
    child = subprocess.run([sys.executable, "-c", DIES_AFTER_LOGGING, experiment_name, str(journals)], env=env,
                           capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    run_id = child.stdout.split()[0]
    assert "cannot schedule new futures" not in child.stderr, child.stderr
    assert took < 45, f"the exit waited {took:.0f} s for a delivery (its timeout is 60 s)"  # was 60 s and more
    run = mlflow.MlflowClient(tracking_uri=mlflow_stack.tracking_uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert s3_objects(mlflow_stack, run.info.artifact_uri) == {"notes.txt": b"logged just before the end"}
    assert not list(journals.glob("*.jsonl")), "the journal stayed behind"


DIES_WITH_THE_SERVER_DOWN = """
import pathlib, sys
from plantml.testing.faults import FaultProxy
from plantml.tracking import MLflowTracker
proxy = FaultProxy(sys.argv[3]).__enter__()
tracker = MLflowTracker(tracking_uri=proxy.url, experiment_name=sys.argv[1], journal_dir=sys.argv[2], delivery_timeout=3,
                        recover_timeout=0)
tracker.start_run()
proxy.inject("status", times=None)  # the server answers 503 from now on
artifact = pathlib.Path(sys.argv[2]).parent / "notes.txt"
artifact.write_text("kept for later")
tracker.log_artifact(artifact)
raise RuntimeError("the script died")
"""


def test_a_script_that_dies_while_the_server_is_down_exits_after_the_delivery_timeout(mlflow_stack, experiment_name,
                                                                                      tmp_path) -> None:
    journals = tmp_path / "journal"
    env = {**os.environ, **mlflow_stack.client_env()}
    started = time.monotonic()
    child = subprocess.run([sys.executable, "-c", DIES_WITH_THE_SERVER_DOWN, experiment_name, str(journals),
                            mlflow_stack.tracking_uri], env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert "the script died" in child.stderr
    assert took < 20, f"the exit took {took:.0f} s with a delivery timeout of 3 s"
    assert len(list(journals.glob("*.jsonl"))) == 1, "the journal must keep what the server did not get"
