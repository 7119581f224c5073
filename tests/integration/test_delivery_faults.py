"""Delivery faults injected for real between the tracker and the MLflow server (a loopback proxy).

The proxy (:class:`plantml.testing.faults.FaultProxy`) hangs a request, resets a
connection, answers 5xx, or forwards a request and drops its answer. Each test asserts
that its fault struck, then reads the run back directly from the server (not through the
proxy): every metric point stored exactly once, the run FINISHED. A refusal is narrowed
down to the entry at fault: the rest of its batch arrives.
"""

from __future__ import annotations

import json

import pytest

from plantml.testing.faults import FaultProxy
from plantml.tracking import MLflowTracker

EPOCHS = 6
KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate")


def is_log_batch(request) -> bool:
    return request.path.endswith("/runs/log-batch")


def carries_metrics(request) -> bool:
    return is_log_batch(request) and b'"metrics"' in request.body and b"train_loss" in request.body


@pytest.fixture
def proxy(mlflow_stack):
    with FaultProxy(mlflow_stack.tracking_uri) as proxy:
        yield proxy


@pytest.fixture
def tracker(proxy, mlflow_stack, experiment_name, tmp_path, monkeypatch):
    monkeypatch.setenv("PLANTML_REQUEST_TIMEOUT", "2")  # a hung request fails in 2 s, not 10
    monkeypatch.setenv("PLANTML_MAX_BACKOFF", "0.5")
    monkeypatch.setenv("PLANTML_LINGER", "0")  # one request per epoch: the faults strike where planned
    tracker = MLflowTracker(proxy.url, experiment_name, mlflow_stack.s3_endpoint, mlflow_stack.aws_access_key,
                            mlflow_stack.aws_secret_key, journal_dir=tmp_path / "journal")
    yield tracker
    tracker.end_run()


def train(tracker, epochs: int = EPOCHS) -> str:
    with tracker.start_run() as run:
        tracker.log_params({"lr": 0.01, "epochs": epochs})
        for epoch in range(epochs):
            tracker.log_training_metrics(epoch, 1 / (epoch + 1), epoch / 10, 2 / (epoch + 1), epoch / 20, 0.01)
            assert tracker.flush(60)
    return run.run_id


def assert_each_epoch_once(client, run_id: str, epochs: int = EPOCHS) -> None:
    for key in KEYS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(epochs)), f"{key}: stored steps {sorted(steps)}"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.01", "epochs": str(epochs)}


@pytest.mark.parametrize("fault, options", [
    ("hang", {"hold_s": 4}),
    ("reset", {"times": 2}),
    ("status", {"times": 3, "status": 503}),
    ("drop_answer", {"times": 2}),
])
def test_every_point_is_stored_once_whatever_the_fault(fault, options, proxy, tracker, mlflow_client):
    proxy.inject(fault, when=carries_metrics, **options)
    run_id = train(tracker)
    assert proxy.mangled[fault] == options.get("times", 1)  # the fault struck
    assert_each_epoch_once(mlflow_client, run_id)
    if fault in ("hang", "reset", "drop_answer"):  # may have arrived: the retry read back first
        assert proxy.count("/metrics/get-history", "GET") >= 1


def test_a_500_caused_by_one_entry_is_narrowed_down_and_the_rest_arrives(proxy, tracker, mlflow_client):
    proxy.inject("status", status=500, times=None, when=lambda r: is_log_batch(r) and b"poison" in r.body)
    with tracker.start_run() as run:
        tracker.log_params({"lr": 0.01, "epochs": EPOCHS})
        for epoch in range(EPOCHS):
            if epoch == 2:
                tracker.set_tag("poison", "the server cannot take this one")
            tracker.log_training_metrics(epoch, 1 / (epoch + 1), epoch / 10, 2 / (epoch + 1), epoch / 20, 0.01)
    assert proxy.mangled["status"] >= 3
    assert_each_epoch_once(mlflow_client, run.run_id)
    tags = mlflow_client.get_run(run.run_id).data.tags
    assert "poison" not in tags and tags["plantml.rejected"] == "1"


def test_a_batch_the_server_refuses_never_drops_its_good_entries(tracker, mlflow_client, tmp_path):
    """A real 400: another client set the param first, with another value."""
    with tracker.start_run() as run:
        mlflow_client.log_param(run.run_id, "lr", "0.1")
        tracker.log_params({"lr": 0.2, "epochs": EPOCHS, "batch_size": 8})
        for epoch in range(EPOCHS):
            tracker.log_training_metrics(epoch, 1 / (epoch + 1), epoch / 10, 2 / (epoch + 1), epoch / 20, 0.01)
    stored = mlflow_client.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"lr": "0.1", "epochs": str(EPOCHS), "batch_size": "8"}
    assert stored.data.tags["plantml.rejected"] == "1"
    for key in KEYS:
        assert sorted(m.step for m in mlflow_client.get_metric_history(run.run_id, key)) == list(range(EPOCHS))
    [kept] = (tmp_path / "journal" / "kept").glob("*.jsonl")  # the record of what was set aside
    refused = [json.loads(line) for line in kept.read_text().splitlines() if '"refused"' in line]
    assert len(refused) == 1 and "HTTP 400" in refused[0]["reason"]


@pytest.mark.parametrize("step", ["/mlflow/logged-models", "/mlflow/model-versions/create"])
def test_a_model_step_whose_answer_is_lost_is_done_once(step, proxy, tracker, mlflow_client, experiment_name):
    """The server made the logged model (or the version), its answer never came: the retry finds it, makes no second."""
    import torch

    name = f"dropped_{experiment_name}"
    proxy.inject("drop_answer", times=1, when=lambda r: r.method == "POST" and r.path.endswith(step))
    with tracker.start_run() as run:
        info = tracker.log_model(torch.nn.Linear(4, 2), "model", registered_model_name=name, wait=120)
    assert proxy.mangled["drop_answer"] == 1  # the fault struck
    assert [int(v.version) for v in mlflow_client.search_model_versions(f"name='{name}'")] == [1]
    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    [logged] = mlflow_client.search_logged_models([experiment.experiment_id])
    assert str(logged.status).endswith("READY") and logged.source_run_id == run.run_id
    assert info.registered_model_version == 1 and info.model_id == logged.model_id
    assert mlflow_client.get_run(run.run_id).info.status == "FINISHED"


def test_an_artifact_the_object_store_refuses_is_set_aside_and_the_rest_arrives(tracker, mlflow_client, mlflow_env, tmp_path):
    """S3 refuses an object key over 1,024 bytes (KeyTooLongError, a 400): no retry can store it."""
    note = tmp_path / "note.txt"
    note.write_text("kept")
    with tracker.start_run() as run:
        tracker.log_artifact(note, "d" * 1100)
        tracker.log_artifact(note, "./kept/.")  # normalised to kept/: S3 stores refuse '.' parts in a key too
        tracker.log_params({"after": "the refused artifact"})
    stored = mlflow_client.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"after": "the refused artifact"}
    assert stored.data.tags["plantml.rejected"] == "1"
    assert [item.path for item in mlflow_client.list_artifacts(run.run_id)] == ["kept"]
    assert [item.path for item in mlflow_client.list_artifacts(run.run_id, "kept")] == ["kept/note.txt"]
