"""The resilient write path under real faults: services of a stack stopped mid-run.

Each test trains a tiny model for a few epochs through MLflowTracker while one service
of this module's own stack is stopped or restarted, then reads back what the server
stores with a plain MlflowClient: every epoch's metrics exactly once, the run's status,
the registry's versions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from plantml.tracking import DeliveryPending, MLflowTracker, PendingModel
from plantml.tracking.recover import recover_journal

pytestmark = pytest.mark.integration

METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def stack(private_mlflow_stack):
    """A stack of this module's own (the session's backend): these tests break services on purpose."""
    return private_mlflow_stack


@pytest.fixture(autouse=True)
def every_service_back(stack):
    """Whatever a test did, the next one starts with every service up."""
    yield
    for service in stack.services.values():
        if not service.running:
            service.start()


@pytest.fixture
def client(stack):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=stack.tracking_uri, registry_uri=stack.tracking_uri)


def make_tracker(stack, tmp_path, **options) -> MLflowTracker:
    return MLflowTracker(
        tracking_uri=stack.tracking_uri, experiment_name=f"faults_{uuid.uuid4().hex[:8]}",
        s3_endpoint=stack.s3_endpoint, aws_access_key=stack.aws_access_key, aws_secret_key=stack.aws_secret_key,
        journal_dir=tmp_path / "journal", **options,
    )


def tiny_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()


def log_epoch(tracker: MLflowTracker, epoch: int) -> float:
    """Log one epoch's metrics; return how long the call blocked."""
    started = time.perf_counter()
    tracker.log_training_metrics(epoch, train_loss=1 / (epoch + 1), train_acc=epoch / 10, val_loss=2 / (epoch + 1),
                                 val_acc=epoch / 20, learning_rate=0.01)
    return time.perf_counter() - started


def in_background(action, *args, delay: float = 0.0) -> threading.Thread:
    def run():
        time.sleep(delay)
        action(*args)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def assert_each_epoch_once(client, run_id: str, epochs: int) -> None:
    for key in (*METRICS, "learning_rate"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(epochs)), f"{key}: stored steps {sorted(steps)}"


# Both on the local session; on containers the kill -9 its supervisor answers (a stop and start is the same client story).
@pytest.mark.parametrize("how", [pytest.param("stopped, started 3 s later", marks=pytest.mark.local_session),
                                 "kill -9, the stack brings it back"])
def test_mlflow_down_mid_training_then_back_loses_nothing(how, stack, client, tmp_path):
    tracker = make_tracker(stack, tmp_path, delivery_timeout=90)
    name = f"clf_{uuid.uuid4().hex[:8]}"
    blocked = []
    restarter = None
    with tracker.start_run() as run:
        tracker.log_params({"lr": 0.01, "epochs": 6})
        for epoch in range(6):
            if epoch == 2 and how.startswith("kill"):
                killed = stack.services["mlflow"].process.pid
                os.kill(killed, signal.SIGKILL)  # what the OOM killer does; the supervisor restarts it
            elif epoch == 2:
                stack.stop("mlflow")
                restarter = in_background(stack.start, "mlflow", delay=3)
            blocked.append(log_epoch(tracker, epoch))
            time.sleep(0.5)
        info = tracker.log_model(tiny_model(), registered_model_name=name)
        if restarter is not None:
            restarter.join()
    if how.startswith("kill"):
        assert stack.services["mlflow"].process.pid != killed  # a new server answered
    assert max(blocked) < 0.05, f"a logging call blocked {max(blocked):.3f} s"
    assert tracker.failed_tries >= 1  # the fault struck: deliveries failed while the server was away
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"lr": "0.01", "epochs": "6"}
    assert_each_epoch_once(client, run.run_id, 6)
    assert info.registered_model_version == 1
    assert client.get_model_version(name, "1").run_id == run.run_id


def test_object_store_down_during_model_upload_back_before_the_end(stack, client, tmp_path, monkeypatch):
    import mlflow.pytorch
    import torch

    tracker = make_tracker(stack, tmp_path, delivery_timeout=90)
    name = f"clf_{uuid.uuid4().hex[:8]}"
    with tracker.start_run() as run:
        for epoch in range(3):
            log_epoch(tracker, epoch)
        stack.stop("s3")
        restarter = in_background(stack.start, "s3", delay=3)
        report = tmp_path / "confusion.txt"
        report.write_text("healthy 9 1\ndiseased 2 8\n")
        tracker.log_artifact(report, "reports")
        report.unlink()  # the caller's file may go at once: the tracker keeps its own copy
        info = tracker.log_model(tiny_model(), registered_model_name=name)
        restarter.join()
    assert tracker.failed_tries >= 1  # the upload failed while the object store was away
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert_each_epoch_once(client, run.run_id, 3)
    assert info.registered_model_version == 1
    for var, value in stack.client_env().items():
        monkeypatch.setenv(var, value)
    loaded = mlflow.pytorch.load_model(f"models:/{name}/1")
    x = torch.randn(5, 4)
    assert torch.allclose(loaded(x), tiny_model()(x), atol=1e-6)
    copy = client.download_artifacts(run.run_id, "reports/confusion.txt", str(tmp_path / "back"))
    assert Path(copy).read_text() == "healthy 9 1\ndiseased 2 8\n"


def test_object_store_down_until_the_end_leaves_a_journal_that_replay_completes(stack, client, tmp_path, monkeypatch):
    import mlflow.pytorch

    tracker = make_tracker(stack, tmp_path, delivery_timeout=3)
    name = f"clf_{uuid.uuid4().hex[:8]}"
    run = tracker.start_run()
    for epoch in range(3):
        log_epoch(tracker, epoch)
    stack.stop("s3")
    info = tracker.log_model(tiny_model(), registered_model_name=name)
    assert isinstance(info, PendingModel)
    with pytest.raises(DeliveryPending, match="plantml tracking replay") as pending:
        tracker.end_run()
    assert tracker.failed_tries >= 1
    journal = pending.value.journal
    assert journal.is_file()
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FAILED"
    assert stored.data.tags["plantml.delivery"] == "pending"
    assert client.search_model_versions(f"name='{name}'") == []  # nothing points at missing files

    stack.start("s3")
    for var, value in stack.client_env().items():  # replay's S3 credentials come from the environment
        monkeypatch.setenv(var, value)
    result = recover_journal(journal, timeout=60)
    assert result.ok and result.status == "FINISHED" and result.model_versions == (1,)
    assert not journal.exists()
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.data.tags["plantml.delivery"] == "complete"
    assert_each_epoch_once(client, run.run_id, 3)
    assert client.get_model_version(name, "1").run_id == run.run_id
    assert mlflow.pytorch.load_model(f"models:/{name}/1") is not None


def test_postgres_restarted_mid_run_loses_nothing(stack, client, tmp_path, monkeypatch):
    tracker = make_tracker(stack, tmp_path, delivery_timeout=90)
    with tracker.start_run() as run:
        for epoch in range(6):
            if epoch == 2:
                restarter = in_background(stack.restart, "postgres")
            log_epoch(tracker, epoch)
            time.sleep(0.3)
        tracker.log_text("done", "notes/done.txt")
        restarter.join()
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert_each_epoch_once(client, run.run_id, 6)
    for var, value in stack.client_env().items():  # listing reads S3 directly
        monkeypatch.setenv(var, value)
    assert [f.path for f in client.list_artifacts(run.run_id, "notes")] == ["notes/done.txt"]


#: Training processes registering versions of one model at once (eight took 68 s of CI's two cores; four race as well).
WORKERS = 4
TRAINING_SCRIPT = textwrap.dedent("""
    import sys, torch
    from plantml.tracking import MLflowTracker

    experiment, name, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tracker = MLflowTracker(experiment_name=experiment, delivery_timeout=120)
    torch.manual_seed(index)
    model = torch.nn.Linear(4, 2)
    with tracker.start_run(run_name=f"worker-{index}"):
        for epoch in range(3):
            tracker.log_training_metrics(epoch, 1.0 / (epoch + 1), 0.5, 1.0, 0.5)
        info = tracker.log_model(model, registered_model_name=name)
    print(info.registered_model_version)
""")


@pytest.mark.slow
@pytest.mark.local_session  # the clients' load on one server: the same server on either backend
def test_four_training_processes_at_once_against_one_stack(stack, client, tmp_path):
    script = tmp_path / "train_one.py"
    script.write_text(TRAINING_SCRIPT)
    experiment, name = f"four_{uuid.uuid4().hex[:8]}", f"shared_{uuid.uuid4().hex[:8]}"
    env = {**__import__("os").environ, **stack.client_env(), "PLANTML_JOURNAL_DIR": str(tmp_path / "journal")}
    workers = [
        subprocess.Popen([sys.executable, str(script), experiment, name, str(i)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(WORKERS)
    ]
    outputs = [worker.communicate(timeout=240) for worker in workers]
    assert [w.returncode for w in workers] == [0] * WORKERS, [err[-2000:] for _, err in outputs]
    printed = sorted(int(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert printed == list(range(1, WORKERS + 1))
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    assert len(runs) == WORKERS and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        assert_each_epoch_once_without_lr(client, run.info.run_id, 3)
    versions = client.search_model_versions(f"name='{name}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, WORKERS + 1))
    assert len({v.run_id for v in versions}) == WORKERS


def assert_each_epoch_once_without_lr(client, run_id: str, epochs: int) -> None:
    for key in METRICS:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(epochs)), key
