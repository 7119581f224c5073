"""MLflowTracker with no server at all: MLflow's local sqlite store in a temporary folder."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plantml.errors import TrackingError, UsageError, ValidationError
from plantml.tracking import MLflowTracker, NonFiniteMetricWarning
from plantml.tracking.open_runs import end_abandoned_runs
from plantml.tracking.validation import TruncatedValueWarning

ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One sqlite store for the module: creating its tables costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def tracker(store_uri, request, tmp_path, monkeypatch) -> MLflowTracker:
    monkeypatch.chdir(tmp_path)
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PLANTML_JOURNAL_DIR", str(tmp_path / "journal"))
    tracker = MLflowTracker(tracking_uri=store_uri, experiment_name=f"unit_{request.node.name}"[:200])
    yield tracker
    tracker.end_run()


def _run(tracker: MLflowTracker, run_id: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracker.tracking_uri).get_run(run_id)


def test_design_examples_work_with_no_server(tmp_path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    Path("model.pth").write_bytes(b"weights")
    Path("logs").mkdir()
    Path("logs/train.log").write_text("epoch 1\n")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    history, summary, model, epoch = {"val_accuracy": [0.9, 0.95]}, "ResNet18", torch.nn.Linear(4, 2), 3

    tracker = MLflowTracker()
    tracker.start_run(run_name="resnet18_experiment", tags={"model": "resnet18"})
    tracker.log_param("learning_rate", 0.001)
    tracker.log_params({"backbone": "resnet18", "epochs": 10, "batch_size": 32})
    tracker.log_metric("accuracy", 0.95, step=10)
    tracker.log_metrics({"train_loss": 0.1, "val_loss": 0.2, "train_acc": 0.95, "val_acc": 0.93}, step=epoch)
    tracker.log_training_metrics(epoch=10, train_loss=0.1, train_acc=0.95, val_loss=0.2, val_acc=0.93, learning_rate=0.0001)
    tracker.log_artifact(Path("model.pth"), artifact_path="models")
    tracker.log_artifacts(Path("logs/"), artifact_path="training_logs")
    tracker.log_figure(fig, "confusion_matrix.png")
    tracker.log_dict(history, "training_history.json")
    tracker.log_text(summary, "model_summary.txt")
    tracker.log_model(model=model, artifact_path="model", registered_model_name="plant_classifier_resnet18")
    tracker.set_tag("status", "production")
    tracker.set_tags({"best_val_accuracy": "0.9500", "best_epoch": "7", "framework": "pytorch"})
    tracker.log_system_metrics()
    tracker.end_run(status="FINISHED")
    runs = tracker.search_runs(filter_string="metrics.val_accuracy > 0.90", max_results=10, order_by=["metrics.val_accuracy DESC"])
    best_run = tracker.get_best_run(metric="val_accuracy", ascending=False)

    assert Path("mlflow.db").is_file()
    assert [run["tags.mlflow.runName"] for run in runs] == ["resnet18_experiment"]
    assert best_run["metrics.val_accuracy"] == 0.93 and best_run["params.backbone"] == "resnet18"
    assert best_run["status"] == "FINISHED"
    artifacts = Path(best_run["artifact_uri"])
    assert artifacts.is_relative_to(tmp_path)
    for name in ("models/model.pth", "training_logs/train.log", "confusion_matrix.png", "training_history.json", "model_summary.txt"):
        assert (artifacts / name).is_file(), name


def test_context_manager_ends_the_run_finished_with_its_heartbeat_and_delivery_tags(tracker) -> None:
    with tracker.start_run(run_name="ok") as run:
        tracker.log_metric("loss", 1.0)
    assert tracker.run_id is None
    stored = _run(tracker, run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.tags["plantml.delivery"] == "complete" and stored.data.tags["plantml.heartbeat"].endswith("Z")


def test_exception_in_context_ends_the_run_failed_with_the_error(tracker) -> None:
    with pytest.raises(RuntimeError, match="out of memory"):
        with tracker.start_run(run_name="crash") as run:
            raise RuntimeError("out of memory")
    stored = _run(tracker, run.run_id)
    assert stored.info.status == "FAILED"
    assert stored.data.tags["plantml.error.type"] == "RuntimeError"
    assert stored.data.tags["plantml.error.message"] == "out of memory"
    assert "RuntimeError: out of memory" in stored.data.tags["plantml.error.traceback"]


def test_run_left_open_is_ended_killed_at_exit(tracker) -> None:
    run = tracker.start_run()
    end_abandoned_runs()
    assert _run(tracker, run.run_id).info.status == "KILLED"


LEFT_IN_A_FUNCTION = """
import sys
from plantml.tracking import MLflowTracker

def train():  # its tracker is dropped on return, its run still open
    tracker = MLflowTracker(tracking_uri=sys.argv[1], experiment_name=sys.argv[2], recover_timeout=0)
    tracker.start_run()
    tracker.log_metric("loss", 0.5, step=1)
    print(tracker.run_id, flush=True)

train()
"""


def test_a_run_whose_tracker_was_dropped_is_still_ended_killed_at_exit(tracker, tmp_path) -> None:
    # was: the tracker, weakly remembered, went with the function's return: the run stayed RUNNING and the metric,
    # still lingering for company, never left the journal
    child = subprocess.run([sys.executable, "-c", LEFT_IN_A_FUNCTION, tracker.tracking_uri, tracker.experiment_name],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 0, child.stderr
    run_id = child.stdout.split()[0]
    stored = _run(tracker, run_id)
    assert stored.info.status == "KILLED"
    assert stored.data.metrics == {"loss": 0.5}
    assert not list((tmp_path / "journal").glob("*.jsonl")), "the journal stayed behind"


def test_a_model_registers_in_a_store_that_is_not_mlflows_global_one(tracker, tmp_path) -> None:
    import mlflow
    import torch

    # the store is in another folder than the working one (MLflow's global default, sqlite:///mlflow.db)
    host_uri = mlflow.get_tracking_uri()
    run = tracker.start_run()
    info = tracker.log_model(torch.nn.Linear(2, 2), registered_model_name="elsewhere", wait=20)
    # was: PendingModel after the wait, "Logged model with ID 'm-…' not found" (looked up in ./mlflow.db, made for it)
    assert getattr(info, "registered_model_version", None) == 1, tracker.last_delivery_error
    tracker.end_run()
    client = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri, registry_uri=tracker.tracking_uri)
    [version] = client.search_model_versions("name='elsewhere'")
    assert version.run_id == run.run_id and _run(tracker, run.run_id).info.status == "FINISHED"
    assert mlflow.get_tracking_uri() == host_uri and not (tmp_path / "mlflow.db").exists()


def test_logging_without_a_run_is_a_usage_error(tracker) -> None:
    with pytest.raises(UsageError, match="no active run"):
        tracker.log_metric("loss", 1.0)


def test_second_start_run_is_refused(tracker) -> None:
    tracker.start_run()
    with pytest.raises(UsageError, match="still active"):
        tracker.start_run()


@pytest.mark.parametrize("name", ["plantml.delivery", "plantml.delivery.journal", "plantml.heartbeat", "plantml.error.type"])
def test_plantmls_own_tags_are_refused_as_a_runs_tags_and_the_run_keeps_its_delivery_record(tracker, name) -> None:
    """A run's own ``plantml.delivery`` tag was overwritten by plantml's at its end (a property test found it on a
    real server); set to ``complete`` on a run still delivering, it would tell recovery to leave its journal."""
    with pytest.raises(ValidationError, match=rf"^tag name '{name}': reserved for plantml's own records"):
        tracker.start_run(tags={name: "mine"})
    run = tracker.start_run()
    with pytest.raises(ValidationError, match=rf"^tag name '{name}': reserved"):
        tracker.set_tag(name, "complete")
    tracker.set_tags({"plantml.verification.id": "x", "plantml.deliveryman": "y"})  # names beside them stay free
    tracker.end_run()
    tags = _run(tracker, run.run_id).data.tags
    assert tags["plantml.delivery"] == "complete" and tags["plantml.deliveryman"] == "y"

def test_invalid_input_is_refused_before_anything_is_sent(tracker, tmp_path) -> None:
    run = tracker.start_run()
    with pytest.raises(ValidationError, match="metric 'val_acc'"):
        tracker.log_metrics({"ok": 1.0, "val_acc": "high"})
    with pytest.raises(ValidationError, match="param name 'bad!'"):
        tracker.log_params({"fine": 1, "bad!": 2})
    with pytest.raises(ValidationError, match="tag name '../x'"):
        tracker.set_tags({"../x": 1})
    with pytest.raises(ValidationError, match="history.json: value at model"):
        tracker.log_dict({"model": object()}, "history.json")
    with pytest.raises(ValidationError, match="no such file"):
        tracker.log_artifact(tmp_path / "absent.pth")
    with pytest.raises(ValidationError, match=r"^artifact 3: expected a path \(str or os.PathLike\), got int$"):
        tracker.log_artifact(3)
    with pytest.raises(ValidationError, match=r"^model 'model': expected a torch.nn.Module, got object$"):
        tracker.log_model(object())  # was a TrackingError (a service failure, exit 1) from MLflow's save
    with pytest.raises(ValidationError, match="metric 'm': value tensor.*meta.* is not a number"):
        tracker.log_metric("m", torch.empty((), device="meta"))  # was torch's bare RuntimeError
    with pytest.raises(ValidationError, match="param 'path': value contains a NUL"):
        tracker.log_params({"fine": 1, "path": "a\x00b"})
    with pytest.raises(ValidationError, match="step 9223372036854775808 is outside"):
        tracker.log_metric("loss", 1.0, step=2**63)
    with pytest.raises(ValidationError, match="metric 'loss': value 1000.* too large"):
        tracker.log_metric("loss", 10**400)
    tracker.end_run()
    data = _run(tracker, run.run_id).data
    assert data.params == {} and data.metrics == {}


def test_changing_a_param_within_a_run_is_refused(tracker) -> None:
    run = tracker.start_run()
    tracker.log_param("lr", 0.1)
    tracker.log_param("lr", 0.1)  # the same value again is harmless and sends nothing
    with pytest.raises(ValidationError, match=r"param 'lr': already logged as '0.1'.*'0.2'"):
        tracker.log_param("lr", 0.2)
    tracker.end_run()
    assert _run(tracker, run.run_id).data.params == {"lr": "0.1"}


def test_non_finite_metrics_are_logged_with_a_warning_that_points_at_the_callers_line(tracker) -> None:
    run = tracker.start_run()
    with pytest.warns(NonFiniteMetricWarning, match="'loss'") as shown:
        tracker.log_metrics({"loss": math.nan, "grad": math.inf})
        tracker.log_metric("again", math.nan)
    with pytest.warns(TruncatedValueWarning) as truncated:
        tracker.log_params({"notes": "x" * 7000})
    tracker.end_run()
    metrics = _run(tracker, run.run_id).data.metrics
    assert math.isnan(metrics["loss"]) and metrics["grad"] > 1e308
    # the user's line, not plantml's (a filter by module=, the printed location): comprehensions are frames too
    assert {(Path(w.filename), w.lineno > 0) for w in [*shown, *truncated]} == {(Path(__file__), True)}


def test_decimal_metrics_are_taken_as_mlflow_takes_them(tracker) -> None:
    from decimal import Decimal

    run = tracker.start_run()
    tracker.log_metric("price", Decimal("0.1"))
    tracker.end_run()
    assert _run(tracker, run.run_id).data.metrics == {"price": 0.1}


def test_log_metrics_is_one_request_with_its_step_and_timestamp(tracker) -> None:
    run = tracker.start_run()
    assert tracker.flush(10)
    before = tracker.requests_sent
    tracker.log_metrics({f"m{i}": float(i) for i in range(150)}, step=4)
    assert tracker.flush(10)
    assert tracker.requests_sent - before == 1
    history = tracker.client.get_metric_history(run.run_id, "m7")
    assert [(m.value, m.step) for m in history] == [(7.0, 4)] and history[0].timestamp > 0


def test_two_trackers_on_two_stores_do_not_interfere(tracker, tmp_path) -> None:
    other = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'other.db'}", experiment_name="other")
    with tracker.start_run(run_name="first"), other.start_run(run_name="second"):
        tracker.log_metric("a", 1.0)
        other.log_metric("b", 2.0)
        tracker.log_text("one", "one.txt")
        other.log_text("two", "two.txt")
    assert [r["tags.mlflow.runName"] for r in tracker.search_runs()] == ["first"]
    assert [r["tags.mlflow.runName"] for r in other.search_runs()] == ["second"]
    assert "metrics.b" not in tracker.search_runs()[0]


def test_logged_model_loads_and_predicts_any_batch_size(tracker, monkeypatch) -> None:
    import mlflow.pytorch
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)  # where load_model looks

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    with tracker.start_run():
        pickled = tracker.log_model(model)
        exported = tracker.log_model(model, artifact_path="model_pt2", input_example=torch.randn(2, 4).numpy())
    for info in (pickled, exported):
        loaded = mlflow.pytorch.load_model(info.model_uri)
        for batch in (1, 2, 7):
            x = torch.randn(batch, 4)
            assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert exported.signature is not None


@pytest.mark.parametrize(("max_results", "order_by"), [(0, None), (-1, None), (50_001, None), ("10", None), (2.5, None),
                                                    (True, None), (10, [1]), (10, 5)])
def test_search_arguments_mlflow_cannot_take_are_a_usage_error_naming_them(tracker, max_results, order_by) -> None:
    with pytest.raises(ValidationError, match="max_results" if order_by is None else "order_by"):
        tracker.search_runs(max_results=max_results, order_by=order_by)


def test_a_run_name_longer_than_mlflow_s_column_is_refused_naming_it_and_no_run_is_made(tracker) -> None:
    with pytest.raises(ValidationError, match="run name 'xxx.*longer than MLflow's 250 characters"):
        tracker.start_run("x" * 251)
    assert tracker.search_runs() == []


def test_an_experiment_name_longer_than_mlflow_s_column_is_refused_naming_it(store_uri) -> None:
    with pytest.raises(ValidationError, match="experiment name 'eee.*longer than MLflow's 256 characters"):
        MLflowTracker(tracking_uri=store_uri, experiment_name="e" * 257)


def test_get_best_run_is_none_without_the_metric(tracker) -> None:
    with tracker.start_run():
        tracker.log_metric("loss", 1.0)
    assert tracker.get_best_run("val_accuracy") is None


def test_get_best_run_honours_the_direction(tracker) -> None:
    for name, value in (("low", 0.1), ("high", 0.9)):
        with tracker.start_run(run_name=name):
            tracker.log_metric("val_loss", value)
    assert tracker.get_best_run("val_loss")["tags.mlflow.runName"] == "high"
    assert tracker.get_best_run("val_loss", ascending=True)["tags.mlflow.runName"] == "low"


def test_a_run_is_journalled_while_it_runs_and_the_journal_goes_once_delivered(tracker, tmp_path) -> None:
    run = tracker.start_run()
    tracker.log_metric("loss", 0.5, step=1)
    journal = tmp_path / "journal" / f"{run.run_id}.jsonl"
    assert '"m":["loss",0.5,' in journal.read_text()
    tracker.end_run()
    assert not journal.exists() and not (tmp_path / "journal" / "spool" / run.run_id).exists()


def test_a_journal_folder_that_cannot_be_written_is_refused_before_any_run_naming_it(tmp_path, store_uri) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the journal folder should be")

    with pytest.raises(UsageError, match=f"^journal folder {blocker}: not a folder$"):
        MLflowTracker(tracking_uri=store_uri, experiment_name="unit_journal_refused", journal_dir=blocker)

    import mlflow

    assert mlflow.MlflowClient(store_uri).get_experiment_by_name("unit_journal_refused") is None  # no run, not even its experiment


def test_a_journal_folder_that_stops_being_writable_fails_the_start_naming_it(tmp_path, store_uri) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.mkdir()
    tracker = MLflowTracker(tracking_uri=store_uri, experiment_name="unit_journal_unwritable", journal_dir=blocker)
    blocker.rmdir()
    blocker.write_text("a file where the journal folder was")
    with pytest.raises(TrackingError, match=f"ended FAILED: journal folder {blocker}: cannot write") as refused:
        tracker.start_run()
    run_id = str(refused.value).split()[1]
    assert _run(tracker, run_id).info.status == "FAILED" and tracker.run_id is None


def test_a_data_set_is_recorded_as_the_runs_dataset_input(tracker) -> None:
    digest = "ab" * 32  # a SHA-256 hex: longer than the 36 characters MLflow keeps
    with tracker.start_run() as run:
        tracker.log_input("leaves", digest, '{"path": "/data/leaves"}', "local", profile={"train_size": 20})
        tracker.log_input("leaves", digest, '{"path": "/data/leaves"}', "local", profile={"train_size": 20})  # twice: one input
    [dataset_input] = _run(tracker, run.run_id).inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.digest, dataset.source_type) == ("leaves", digest[:32], "local")
    assert dataset.profile == '{"train_size": 20}'
    assert [(tag.key, tag.value) for tag in dataset_input.tags] == [("mlflow.data.context", "training")]


@pytest.mark.parametrize("field, value, message", [
    ("name", "", "data set name '': must be a non-empty string"),
    ("source_type", "s" * 37, "longer than MLflow's 36 characters"),
    ("name", "le\x00aves", "NUL character"),
])
def test_a_data_set_mlflow_cannot_store_is_refused_at_the_call(tracker, field, value, message) -> None:
    fields = {"name": "leaves", "digest": "d1", "source": "/data", "source_type": "local", field: value}
    with tracker.start_run():
        with pytest.raises(ValidationError, match=message):
            tracker.log_input(**fields)


def test_the_journal_is_fsynced_at_each_epochs_end_and_on_flush(tracker, monkeypatch) -> None:
    """What survives a power cut is what was fsynced: an epoch's metrics at once, not only on the timer."""
    import os
    import time

    from plantml.tracking import sender

    monkeypatch.setattr(sender, "SYNC_INTERVAL_S", 3600.0)  # no timer: only the syncs asked for
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    run = tracker.start_run()
    journal = str(Path(os.environ["PLANTML_JOURNAL_DIR"]) / f"{run.run_id}.jsonl")

    def journal_synced_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if journal in synced:
                return True
            time.sleep(0.01)
        return False

    journal_synced_within(0.5)
    synced.clear()
    tracker.log_param("lr", 0.01)  # written (the kernel has it), not an epoch's end
    assert not journal_synced_within(0.5)
    tracker.log_training_metrics(0, 0.9, 0.5, 0.8, 0.6, 0.01)  # an epoch ended
    assert journal_synced_within(0.5)
    synced.clear()
    tracker.log_param("wd", 0.1)
    assert tracker.flush(10)
    assert journal in synced


def test_saving_a_pickled_model_does_not_warn_about_plantmls_own_choice(tmp_path) -> None:
    """MLflow warns on every pickled PyTorch model; plantml pickles on purpose (the README says why), so a
    training's output does not repeat it. The control: MLflow's own call still warns."""
    import logging

    import mlflow.pytorch
    import torch

    from plantml.tracking.models import save_model

    seen: list[str] = []
    recorder = logging.Handler()
    recorder.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    flavor_log = logging.getLogger("mlflow.pytorch")
    flavor_log.addHandler(recorder)
    try:
        save_model(tmp_path / "ours", torch.nn.Linear(2, 2), "run", "pickle")
        assert not [message for message in seen if "Pickle" in message] and flavor_log.filters == []
        mlflow.pytorch.save_model(torch.nn.Linear(2, 2), str(tmp_path / "theirs"), serialization_format="pickle",
                                  pip_requirements=["torch"])
        assert [message for message in seen if "Pickle" in message]
    finally:
        flavor_log.removeHandler(recorder)


def test_a_forked_process_is_refused_the_parents_run_and_its_exit_leaves_the_run_alone(tracker) -> None:
    run = tracker.start_run()
    tracker.log_metric("loss", 1.0, step=0)
    pid = os.fork()
    if pid == 0:  # the child: refused at once (never a hang on a lock the sender held, never a silent loss)
        signal.alarm(30)
        code = 3
        try:
            tracker.log_metric("loss", 2.0, step=1)
        except UsageError as exc:
            code = 0 if f"belongs to process {os.getppid()}" in str(exc) else 4
        end_abandoned_runs()  # what the child's atexit does
        with tracker.start_run() as own:  # a run of its own is the child's to log
            tracker.log_metric("loss", 4.0)
        os._exit(code if _run(tracker, own.run_id).data.metrics == {"loss": 4.0} else 5)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _run(tracker, run.run_id).info.status == "RUNNING"
    tracker.log_metric("loss", 3.0, step=2)
    tracker.end_run()
    stored = _run(tracker, run.run_id)
    assert stored.info.status == "FINISHED" and "plantml.delivery.requested_status" not in stored.data.tags


@pytest.mark.parametrize("name", ["confusion_matrix", "figures/curves.svg"])
def test_a_figure_is_stored_under_the_name_given_with_or_without_an_extension(tracker, name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    with tracker.start_run() as run:
        tracker.log_figure(plt.figure(), name)
    assert [a.path for a in mlflow.MlflowClient(tracker.tracking_uri).list_artifacts(run.run_id, name.rpartition("/")[0] or None)] == [name]
    assert "plantml.rejected" not in _run(tracker, run.run_id).data.tags


def test_an_artifact_that_is_no_regular_file_is_refused_naming_it_not_the_journal(tracker, tmp_path) -> None:
    folder = tmp_path / "outputs"
    folder.mkdir()
    (folder / "ok.txt").write_text("ok")
    (folder / "latest.ckpt").symlink_to(folder / "gone.ckpt")
    os.mkfifo(tmp_path / "pipe")
    with tracker.start_run():
        with pytest.raises(ValidationError, match=f"artifact '{folder / 'latest.ckpt'}': not a regular file"):
            tracker.log_artifacts(folder)
        with pytest.raises(ValidationError, match=f"artifact '{tmp_path / 'pipe'}': not a regular file"):
            tracker.log_artifact(tmp_path / "pipe")
        tracker.log_artifact(folder / "ok.txt")  # the spool is fine


def test_a_relative_journal_folder_survives_the_caller_changing_folder(store_uri, tmp_path, monkeypatch) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLANTML_JOURNAL_DIR", "journal")
    tracker = MLflowTracker(tracking_uri=store_uri, experiment_name="unit_relative_journal")
    Path("notes.txt").write_text("notes")
    (tmp_path / "elsewhere").mkdir()
    with tracker.start_run() as run:
        tracker.log_artifact("notes.txt")
        tracker.log_text("hello", "hello.txt")
        monkeypatch.chdir(tmp_path / "elsewhere")  # a training that moves into its output folder
    assert sorted(a.path for a in mlflow.MlflowClient(store_uri).list_artifacts(run.run_id)) == ["hello.txt", "notes.txt"]
    assert "plantml.rejected" not in _run(tracker, run.run_id).data.tags and not (tmp_path / "journal" / "kept").exists()


def test_two_threads_logging_one_param_with_two_values_get_one_accepted_and_one_refused(tracker, monkeypatch) -> None:
    import threading
    import time

    from plantml.tracking.journal import Journal

    append = Journal.append
    monkeypatch.setattr(Journal, "append", lambda self, *args, **kwargs: (time.sleep(0.01), append(self, *args, **kwargs))[1])
    start, outcomes = threading.Barrier(2), []

    def log(value: str) -> None:
        start.wait()
        try:
            tracker.log_param("lr", value)
            outcomes.append(value)
        except ValidationError:
            outcomes.append("refused")

    with tracker.start_run() as run:
        threads = [threading.Thread(target=log, args=(value,)) for value in ("0.1", "0.2")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(outcomes)[1] == "refused", outcomes
    stored = _run(tracker, run.run_id).data
    assert stored.params == {"lr": sorted(outcomes)[0]} and "plantml.rejected" not in stored.tags
