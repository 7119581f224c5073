"""The tracker at its edges, on a local sqlite store: a journal folder that stops taking writes once the run
is delivered, the owner-only folders it makes, model names MLflow refuses, a model that cannot be saved."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plantml.cli import main
from plantml.errors import TrackingError, ValidationError
from plantml.tracking import MLflowTracker

ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture
def journal(tmp_path, monkeypatch) -> Path:
    """A journal folder that does not exist yet, two levels below ``tmp_path``; the client settings cleared."""
    monkeypatch.chdir(tmp_path)
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "cache" / "journal"
    monkeypatch.setenv("PLANTML_JOURNAL_DIR", str(folder))
    return folder


@pytest.fixture
def tracker(journal, tmp_path, request) -> MLflowTracker:
    tracker = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name=request.node.name[:100])
    yield tracker
    tracker.end_run()


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """``path`` refuses new files, removals and renames, even to root (``chattr +i``), for the block."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o700)


def test_a_run_delivered_whole_ends_quietly_when_its_journal_cannot_be_removed(tracker, journal, caplog) -> None:
    """Was: ``PermissionError`` from the ``with`` block of a run the server had whole (FINISHED, every point)."""
    with tracker.start_run(run_name="folder-turned-read-only") as run:
        tracker.log_metric("loss", 1.0, step=0)
        with unwritable(journal):
            tracker.log_metric("loss", 0.5, step=1)  # the journal file itself still takes writes
            tracker.end_run()

    stored = tracker.client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.data.tags["plantml.delivery"] == "complete"
    assert [m.value for m in tracker.client.get_metric_history(run.run_id, "loss")] == [1.0, 0.5]
    left = journal / f"{run.run_id}.jsonl"
    assert left.exists()
    assert any("everything was delivered, but the file could not be removed" in m for m in caplog.messages)

    assert main(["tracking", "replay", str(left)]) == 0  # once the folder takes writes again, it tidies the journal away
    assert not left.exists() and tracker.client.get_run(run.run_id).info.status == "FINISHED"


def test_the_journal_folder_and_its_spool_are_owner_only(tracker, journal, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("leaf counts")
    with tracker.start_run() as run:
        tracker.log_artifact(tmp_path / "notes.txt")
        assert (journal.stat().st_mode & 0o777, (journal / "spool").stat().st_mode & 0o777) == (0o700, 0o700)
        assert (journal / f"{run.run_id}.jsonl").stat().st_mode & 0o777 == 0o600  # the run's journal file too


@pytest.mark.parametrize("name", ["models/best", "best.pt", "model:v2", "50%", "it's", "a\\b", ""])
def test_a_model_name_mlflow_refuses_is_one_line_at_the_call_and_nothing_is_sent(tracker, journal, name) -> None:
    import torch

    with tracker.start_run() as run:
        with pytest.raises(ValidationError, match=r"model name .*MLflow's rule for logged models"):
            tracker.log_model(torch.nn.Linear(2, 2), name)
        assert not (journal / "spool" / run.run_id).exists() or not any((journal / "spool" / run.run_id).iterdir())

    assert "plantml.rejected" not in tracker.client.get_run(run.run_id).data.tags


def test_a_model_that_cannot_be_saved_is_named_by_the_name_it_was_given(tracker) -> None:
    import threading

    import torch

    unpicklable = torch.nn.Linear(2, 2)
    unpicklable.lock = threading.Lock()  # no pickle module saves a lock
    with tracker.start_run():
        with pytest.raises(TrackingError, match=r"^model 'classifier': could not be saved: "):
            tracker.log_model(unpicklable, "classifier")
        with pytest.raises(ValidationError, match=r"^model 'classifier': expected a torch.nn.Module, got dict$"):
            tracker.log_model({"not": "a model"}, "classifier")  # bad input (exit 2), not a failure to save


@pytest.mark.parametrize(("first", "second", "same"), [
    ("http://localhost:5000/", "http://127.0.0.1:5000", True),
    ("HTTP://127.0.0.1:80", "http://127.0.0.1/", True),
    ("https://[::1]:8443/mlflow/", "https://localhost:8443/mlflow", True),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5001", False),
    ("http://127.0.0.1:5000", "https://127.0.0.1:5000", False),
    ("sqlite:////data/runs/../mlflow.db", "sqlite:////data/mlflow.db", True),
    ("sqlite:////data/a.db", "sqlite:////data/b.db", False),
])
def test_two_spellings_of_one_store_are_the_same_store(first, second, same) -> None:
    from plantml.tracking.stores import same_store

    assert same_store(first, second) is same and same_store(second, first) is same


def test_a_dead_process_journal_for_the_same_server_spelt_otherwise_is_found(tmp_path) -> None:
    """Was: a journal written through ``http://localhost:P/`` was left to ``plantml tracking recover`` by hand
    when a new tracker on ``http://127.0.0.1:P`` looked for what dead processes left for its server."""
    import sys

    from plantml.tracking.journal import Journal
    from plantml.tracking.journal_format import JournalHeader
    from plantml.tracking.recover import recover_orphans

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    live = JournalHeader.for_this_process("0" * 32, "http://localhost:5999/", "1")
    header = JournalHeader("0" * 32, "http://localhost:5999/", "1", live.created, live.host, child.pid, 1.0, "j1")
    Journal.create(tmp_path, header, 10).close()

    assert recover_orphans(tmp_path, tracking_uri="http://127.0.0.1:5999") == [tmp_path / f"{'0' * 32}.jsonl"]
    assert recover_orphans(tmp_path, tracking_uri="http://127.0.0.1:6000") == []


def test_a_new_sqlite_store_under_a_literal_tilde_is_refused_in_one_line(journal, tmp_path) -> None:
    from plantml.errors import ConfigError

    with pytest.raises(ConfigError, match=r"SQLite reads ~ as a folder name .*write the full path: sqlite:///"):
        MLflowTracker(tracking_uri="sqlite:///~/runs.db", experiment_name="tilde")
    assert not (tmp_path / "~").exists()


def test_an_integer_tensor_is_a_step_as_it_is_a_value(tracker) -> None:
    import torch

    with tracker.start_run() as run:
        tracker.log_training_metrics(torch.tensor(2), torch.tensor(0.5), 0.8, 0.6, 0.7)  # was: step tensor(2) is not an integer
        with pytest.raises(ValidationError, match=r"step 2\.0 is not an integer"):
            tracker.log_metric("loss", 0.1, step=torch.tensor(2.0))

    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run.run_id, "train_loss")] == [(2, 0.5)]


def test_why_a_delivery_is_pending_is_still_told_after_the_run_ended(tracker, monkeypatch) -> None:
    from plantml.tracking.sender import DeliveryPending
    from plantml.tracking.transport import Transport

    monkeypatch.setattr(Transport, "log_batch", lambda self, *args: (_ for _ in ()).throw(ConnectionError("object store away")))
    tracker.start_run()
    tracker.log_metric("loss", 1.0)
    with pytest.raises(DeliveryPending):
        tracker.end_run(timeout=2)

    assert "object store away" in tracker.last_delivery_error  # was None once the run had ended


def tracker_with_artifacts_at(tmp_path: Path, s3_endpoint: str) -> MLflowTracker:
    """A tracker on a sqlite store whose experiment keeps artifacts in S3 at ``s3_endpoint``, in a run that has
    logged one small artifact (``notes.txt``)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("s3-store", artifact_location="s3://mlflow/artifacts")
    tracker = MLflowTracker(uri, "s3-store", s3_endpoint=s3_endpoint, aws_access_key="plantml", aws_secret_key="not-checked")
    tracker.start_run()
    tracker.log_text("leaf counts", "notes.txt")
    return tracker


def test_a_run_ended_while_the_object_store_hangs_says_what_it_waited_for(journal, tmp_path) -> None:
    """Was: "not everything was delivered to <tracking server> (no answer in time)": the server had answered
    everything; the object store, which accepts connections and never answers, held the artifact."""
    import socket

    from plantml.tracking.sender import DeliveryPending

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the kernel's backlog; nothing ever reads or answers them
    tracker = tracker_with_artifacts_at(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryPending, match=r"no answer in time for artifact 'notes\.txt'"):
            tracker.end_run(timeout=2)
        # was 3 minutes: marking the run pending waited for MLflow's settings, held by the upload in flight
        assert time.monotonic() - started < 30
    finally:
        silent.close()  # the upload in flight is reset


def test_an_upload_is_one_boto3_try_the_senders_own_retries_do_the_rest(journal, tmp_path) -> None:
    """boto3's own retries (3 to 5 a call) made a process wait at its exit for minutes of an object store's
    failures; plantml's S3 calls make one try each (AWS_MAX_ATTEMPTS=1), as every request says."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from plantml.tracking.sender import DeliveryPending

    tries: list[str] = []

    class Busy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self) -> None:
            if self.command == "PUT":
                tries.append(self.headers.get("amz-sdk-request", ""))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_GET = do_HEAD = do_POST = answer  # noqa: N815 - http.server's names

        def log_message(self, *args: object) -> None:
            pass

    busy = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    tracker = tracker_with_artifacts_at(tmp_path, f"http://127.0.0.1:{busy.server_address[1]}")
    try:
        with pytest.raises(DeliveryPending):
            tracker.end_run(timeout=3)
    finally:
        busy.shutdown()
        busy.server_close()
    assert tries and all(header.endswith("max=1") for header in tries), tries


@pytest.mark.parametrize("name, message", [
    ("team/leaves", r"registered model name 'team/leaves': MLflow's registry refuses"),
    # bytes that are not UTF-8: was saved and sent, then failed its delivery with a codec error, the run FAILED
    ("x\udcffy", r"registered model name 'x%FFy': holds bytes that are not UTF-8"),
], ids=["slash", "latin1"])
def test_a_registered_model_name_the_registry_refuses_is_one_line_before_the_model_is_saved(tracker, journal, name,
                                                                                             message) -> None:
    import torch

    with tracker.start_run() as run:
        with pytest.raises(ValidationError, match=message):
            tracker.log_model(torch.nn.Linear(2, 2), registered_model_name=name)
        assert not (journal / "spool" / run.run_id).exists()


def test_a_tracker_handed_to_another_process_or_copied_is_one_line(tracker) -> None:
    """Was ``TypeError: cannot pickle '_thread.RLock' object`` from a spawned DataLoader worker's arguments."""
    import copy
    import pickle

    from plantml.errors import UsageError

    for attempt in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(UsageError, match=r"^an MLflowTracker cannot be pickled or copied .*make one in each process"):
            attempt(tracker)


@pytest.mark.parametrize("end_error, logged", [
    ("run abc: not everything was delivered to http://x (no answer in time)",
     "run abc: not everything was delivered to http://x (no answer in time)"),
    ("tracking server http://x unreachable", "run abc: tracking server http://x unreachable"),
])
def test_a_with_block_whose_run_cannot_end_logs_the_run_id_once(caplog, end_error, logged) -> None:
    """The error of the block propagates; the run's end failing too is one warning, which named the run twice
    ("run abc: run abc: not everything was delivered…") when the tracker's own message named it already."""
    import logging
    from types import SimpleNamespace

    from plantml.tracking.runs import TrackedRun

    def end_run(status, error=None):
        raise TrackingError(end_error)

    tracker = SimpleNamespace(run_id="abc", end_run=end_run)
    with caplog.at_level(logging.WARNING, logger="plantml.tracking"), pytest.raises(ValueError, match="the block's"):
        with TrackedRun(tracker, SimpleNamespace(info=SimpleNamespace(run_id="abc"))):
            raise ValueError("the block's error")
    assert [record.getMessage() for record in caplog.records] == [logged]


def test_a_connection_failure_is_named_in_the_systems_words_not_urllib3s_wrappers() -> None:
    """requests wraps a refused connection three times (ConnectionError, MaxRetryError, NewConnectionError): the
    one-line errors that name a server that did not answer said "HTTPConnectionPool(host=...): Max retries exceeded
    with url: ... (Caused by NewConnectionError(...))"."""
    import socket

    import requests

    from plantml.errors import connection_reason

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)  # accepts, never answers
        silent = listening.getsockname()[1]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            refused = closed.getsockname()[1]
        reasons = []
        for port, timeout in ((refused, 3), (silent, (3, 0.5))):
            with pytest.raises(requests.RequestException) as failure:
                requests.get(f"http://127.0.0.1:{port}/api", timeout=timeout)
            reasons.append(connection_reason(failure.value))
    assert reasons == ["Connection refused", "timed out"]
    assert connection_reason(ValueError("not a connection\nsecond line")) == "not a connection"


def test_a_name_a_database_store_cannot_encode_is_a_refusal_not_a_failure_to_retry(tmp_path) -> None:
    """A journal written before names were checked for bytes that are not UTF-8 holds a registration under such a
    name: MLflow's database store wraps the UnicodeEncodeError in an INTERNAL_ERROR, which was retried until the
    recovery's timeout (300 s) each time, then kept; it is now set aside as refused, and the run ends."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from plantml.tracking.transport import is_refusal

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(MlflowException) as failure:
        client.create_registered_model("x\udcffy")

    assert failure.value.error_code == "INTERNAL_ERROR" and is_refusal(failure.value)
