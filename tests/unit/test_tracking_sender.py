"""The sender and the delivery function without a server: a fake one that can be down, lose answers or refuse.

The fake replaces only the network calls of :class:`Transport`; batching, the read-back,
the retry policy and the narrowing of refusals are the real code. The same behaviours
are tried against the real server, through a faulty proxy, in
``tests/integration/test_delivery_faults.py``.
"""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plantml.settings import TrackingSettings
from plantml.tracking.batches import take_batch
from plantml.tracking.entries import End, MetricPoint, Param, Record, Tag
from plantml.tracking.journal import Journal, JournalBusy
from plantml.tracking.journal_format import JournalHeader
from plantml.tracking.recover import finish_run
from plantml.tracking.sender import DeliveryPending, DeliverySettings, RunSender
from plantml.tracking.spool import Spool
from plantml.tracking.transport import REJECTED_TAG, RunState, ServerError, Transport, is_refusal
from plantml.tracking.validation import MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH


class FakeServer(Transport):
    """Stores what it is sent. ``down`` refuses connections; ``lose_answers`` stores, then fails;
    ``refuse``/``fail_500``/``fail_503`` answer so for any request carrying that key."""

    def __init__(self) -> None:
        super().__init__(TrackingSettings(tracking_uri="http://127.0.0.1:1", aws_secret_key="s3cr3t-value"), None, "1")
        self.down = False
        self.lose_answers = 0
        self.refuse: set[str] = set()
        self.fail_500: set[str] = set()
        self.fail_503: set[str] = set()
        self.unavailable_status = 503  # what fail_503 answers: 502, 503 or 504
        self.deleted = False
        self.forbidden = False
        self.points: list[tuple[str, float, int, int]] = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.status: str | None = None
        self.log_requests = 0
        self.lock = threading.Lock()

    def _gate(self) -> None:
        if self.down:
            raise ConnectionRefusedError("connection refused")
        if self.forbidden:
            raise ServerError(403, "PERMISSION_DENIED", "Permission denied")

    def log_batch(self, run_id, metrics, params, tags) -> None:
        self._gate()
        with self.lock:
            self.log_requests += 1
            keys = {m.key for m in metrics} | {p.key for p in params} | {t.key for t in tags}
            if self.deleted:
                raise ServerError(400, "INVALID_PARAMETER_VALUE", "the run must be in the 'active' state")
            for bad, status in ((self.refuse, 400), (self.fail_500, 500), (self.fail_503, self.unavailable_status)):
                if keys & bad:
                    raise ServerError(status, "ERR", f"cannot take {sorted(keys & bad)}")
            self.points += [(m.key, m.value, m.timestamp, m.step) for m in metrics]
            self.params.update({p.key: p.value for p in params})
            self.tags.update({t.key: t.value for t in tags})
            if self.lose_answers:
                self.lose_answers -= 1
                raise TimeoutError("read timed out")  # stored, but the client never hears it

    def stored_points(self, run_id, key):
        self._gate()
        return {(s, t, v) for k, v, t, s in self.points if k == key}

    def stored_params(self, run_id):
        self._gate()
        return dict(self.params)

    def run_state(self, run_id):
        self._gate()
        return RunState(self.status or "RUNNING", self.deleted, dict(self.tags))

    def terminate(self, run_id, status, end_time=None) -> None:
        self._gate()
        self.status = status


def points(n: int, key: str = "loss") -> list[MetricPoint]:
    return [MetricPoint(key, float(i), 1_000 + i, i) for i in range(n)]


SETTINGS = DeliverySettings(timeout_s=5, max_in_memory=1000, max_backoff_s=0.05, request_timeout_s=0.5, linger_s=0)


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


def make_sender(fake, tmp_path, **overrides) -> RunSender:
    settings = DeliverySettings(**{**SETTINGS.__dict__, "journal_dir": tmp_path, **overrides})
    journal = Journal.create(tmp_path, JournalHeader.for_this_process("run", fake.settings.tracking_uri, "1"),
                             settings.max_in_memory)
    return RunSender(fake, journal, settings, "run")


@pytest.fixture
def sender(fake, tmp_path):
    sender = make_sender(fake, tmp_path)
    yield sender
    sender.stop()
    sender.journal.close()


def test_logging_returns_at_once_while_the_server_is_down(sender, fake) -> None:
    fake.down = True
    started = time.perf_counter()
    for step in range(200):
        sender.write([MetricPoint("loss", 1.0, 5, step)])
    assert time.perf_counter() - started < 0.5
    assert not sender.flush(timeout=0.3) and sender.journal.pending_count() == 200
    fake.down = False
    assert sender.flush(timeout=5)
    assert sorted(p[3] for p in fake.points) == list(range(200))


def test_a_batch_whose_answer_was_lost_is_not_stored_twice(sender, fake) -> None:
    fake.lose_answers = 1
    sender.write([*points(50), Param("lr", "0.1")])
    assert sender.flush(timeout=5)
    assert len(fake.points) == 50 and len(set(fake.points)) == 50
    assert fake.params == {"lr": "0.1"} and fake.lose_answers == 0  # the fault happened


def test_small_calls_leave_together_in_few_requests(sender, fake) -> None:
    fake.down = True
    for step in range(2500):
        sender.write([MetricPoint("loss", 0.5, 7, step)])
    fake.down = False
    assert sender.flush(timeout=10)
    assert fake.log_requests == 3 and len(fake.points) == 2500


def test_calls_within_the_linger_leave_in_one_request(fake, tmp_path) -> None:
    sender = make_sender(fake, tmp_path, linger_s=0.5)
    for epoch in range(3):  # three epochs' metrics, logged in quick succession
        sender.write([MetricPoint("loss", 1.0 / (epoch + 1), 1000 + epoch, epoch)])
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while len(fake.points) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(fake.points) == 3 and fake.log_requests == 1
    started = time.monotonic()
    sender.write(points(2, "other"))
    assert sender.flush(timeout=5) and time.monotonic() - started < 0.4  # a flush does not wait for the linger
    sender.stop()


def test_a_refused_entry_is_set_aside_and_the_rest_of_its_batch_arrives(sender, fake) -> None:
    fake.refuse = {"bad"}
    sender.write([*points(40), Param("bad", "x"), Param("good", "y"), *points(40, "acc")])
    assert sender.flush(timeout=5)
    assert len(fake.points) == 80 and fake.params == {"good": "y"}
    [aside] = sender.rejected
    assert aside.record.entry == Param("bad", "x") and "HTTP 400" in aside.reason
    assert sender.journal.refused == {aside.record.seq: aside.reason}
    assert sender.flush(timeout=5)  # the count was journalled behind the batch: now it is delivered too
    assert fake.tags[REJECTED_TAG] == "1"  # counted on the run


def test_a_500_that_repeats_while_the_server_answers_reads_is_narrowed_down(sender, fake) -> None:
    fake.fail_500 = {"poison"}
    sender.write([*points(30), Tag("poison", "\x00"), Tag("fine", "1")])
    assert sender.flush(timeout=10)
    assert len(fake.points) == 30 and fake.tags["fine"] == "1" and "poison" not in fake.tags
    assert [a.record.entry.key for a in sender.rejected] == ["poison"] and "HTTP 500" in sender.rejected[0].reason


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_gateway_or_unavailable_answer_is_never_blamed_on_an_entry(status, sender, fake) -> None:
    fake.fail_503, fake.unavailable_status = {"lr"}, status
    sender.write([Param("lr", "0.1"), *points(5)])
    assert not sender.flush(timeout=1.0)  # retried, never set aside
    assert sender.rejected == [] and sender.failures >= 3
    fake.fail_503 = set()
    assert sender.flush(timeout=5)
    assert fake.params == {"lr": "0.1"} and len(fake.points) == 5


def test_a_deleted_run_stops_delivery_and_keeps_everything_in_the_journal(sender, fake) -> None:
    fake.deleted = True
    sender.write(points(10))
    assert not sender.flush(timeout=5)
    assert "deleted" in str(sender.gone) and sender.rejected == []
    assert len(sender.journal.pending(100)) == 10


def test_credentials_the_server_refuses_set_nothing_aside(sender, fake) -> None:
    fake.forbidden = True
    sender.write(points(10))
    assert not sender.flush(timeout=5)
    assert "cannot be read" in str(sender.gone) and "403" in str(sender.gone)
    assert sender.rejected == [] and len(sender.journal.pending(100)) == 10  # all kept for a later try


def test_the_sender_survives_an_unexpected_error(sender, fake, monkeypatch) -> None:
    original = fake.send
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("a bug in a dependency")
        return original(*args, **kwargs)

    monkeypatch.setattr(fake, "send", flaky)
    sender.write(points(3))
    assert sender.flush(timeout=5)
    assert len(calls) >= 2 and len(fake.points) == 3


def test_finishing_delivers_everything_then_removes_the_journal(sender, fake, tmp_path) -> None:
    sender.write(points(5))
    report = finish_run(sender, Spool.of_run(tmp_path, "run"), End("FINISHED", 9), timeout=5)
    assert report.error is None and fake.status == "FINISHED" and fake.tags["plantml.delivery"] == "complete"
    assert not (tmp_path / "run.jsonl").exists()


def test_finishing_against_a_dead_server_keeps_the_journal_without_secrets(sender, fake, tmp_path) -> None:
    sender.write(points(3))
    assert sender.flush(timeout=5)
    fake.down = True
    sender.write([MetricPoint("loss", 9.0, 99, 9), Tag("stage", "done")])
    report = finish_run(sender, Spool.of_run(tmp_path, "run"), End("FINISHED", 9), timeout=0.3)
    assert "plantml tracking replay" in str(report.error) and report.journal == tmp_path / "run.jsonl"
    reopened = Journal.open_existing(report.journal)
    assert [r.entry for r in reopened.pending(100)] == [MetricPoint("loss", 9.0, 99, 9), Tag("stage", "done"), End("FINISHED", 9)]
    assert "s3cr3t-value" not in report.journal.read_text()
    assert fake.status is None  # never FINISHED while something is missing
    reopened.close()


def test_a_request_in_flight_when_the_end_times_out_journals_its_outcome_before_the_journal_is_let_go(sender, fake, tmp_path,
                                                                                                       monkeypatch) -> None:
    answer, original = threading.Event(), fake.log_batch
    monkeypatch.setattr(fake, "log_batch", lambda *args: answer.wait(10) and original(*args))  # a long upload, say
    sender.write(points(3))
    report = finish_run(sender, Spool.of_run(tmp_path, "run"), End("FINISHED", 9), timeout=0.3)
    assert isinstance(report.error, DeliveryPending)
    with pytest.raises(JournalBusy):  # a replay now would send the request in flight a second time
        Journal.open_existing(report.journal)
    answer.set()
    sender._thread.join(5)
    reopened = Journal.open_existing(report.journal)
    assert len(fake.points) == 3 and [r.entry for r in reopened.pending(100)] == [End("FINISHED", 9)]
    reopened.close()


def test_a_tag_set_every_step_leaves_with_full_batches_and_its_last_value_wins(sender, fake) -> None:
    sender.write([entry for step in range(600)
                  for entry in (MetricPoint("loss", float(step), 1_000 + step, step), Tag("progress", f"{step + 1}/600"))])
    assert sender.flush(timeout=5)
    assert len(fake.points) == 600 and fake.tags["progress"] == "600/600"
    assert fake.log_requests <= 3  # 2 records a step: 1000 to a request (one step each would be 600)


def test_batches_split_on_a_repeated_param_and_send_ends_alone() -> None:
    records = [Record(1, Param("lr", "a")), Record(2, MetricPoint("x", 1.0, 1, 0)), Record(3, Param("lr", "b"))]
    assert len(take_batch(records)) == 2
    records = [Record(1, MetricPoint("x", 1.0, 1, 0)), Record(2, End("FINISHED", 1))]
    assert len(take_batch(records)) == 1 and take_batch(records[1:]) == [records[1]]


@settings(max_examples=60, deadline=None)
@given(n_metrics=st.integers(0, 3000), n_params=st.integers(0, 300), n_tags=st.integers(0, 300),
       value_len=st.sampled_from([1, 100, 6000]), seed=st.randoms(use_true_random=False))
def test_batches_never_exceed_mlflow_limits_and_keep_the_order(n_metrics, n_params, n_tags, value_len, seed) -> None:
    entries = ([MetricPoint(f"m{i % 50}", float(i), 1, i) for i in range(n_metrics)] + [Param(f"p{i}", "v" * value_len) for i in range(n_params)]
               + [Tag(f"t{i}", "v" * value_len) for i in range(n_tags)])
    seed.shuffle(entries)
    records = [Record(i + 1, e) for i, e in enumerate(entries)]
    sent: list[Record] = []
    while len(sent) < len(records):
        batch = take_batch(records[len(sent):])
        kinds = [type(r.entry) for r in batch]
        assert 0 < len(batch) <= MAX_ENTITIES_PER_BATCH
        assert kinds.count(MetricPoint) <= MAX_METRICS_PER_BATCH
        assert kinds.count(Param) <= MAX_PARAMS_TAGS_PER_BATCH and kinds.count(Tag) <= MAX_PARAMS_TAGS_PER_BATCH
        assert sum(len(getattr(r.entry, "value", "")) if not isinstance(r.entry, MetricPoint) else 0 for r in batch) < 1_000_000
        sent += batch
    assert sent == records


def test_the_log_batch_body_is_what_mlflow_protobuf_json_reads() -> None:
    import json
    import math

    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.utils.proto_json_utils import parse_dict

    from plantml.tracking.transport import log_batch_body

    metrics = [MetricPoint("loss", 0.25, 1_700_000_000_000, 2**62), MetricPoint("nan", math.nan, 1, 0),
               MetricPoint("inf", -math.inf, 1, -1)]
    body = log_batch_body("run", metrics, [Param("lr", "0.1")], [Tag("note", "é ✓")])
    message = LogBatch()
    parse_dict(json.loads(body), message)  # what the server does with it
    assert [(m.key, m.step) for m in message.metrics] == [("loss", 2**62), ("nan", 0), ("inf", -1)]
    assert message.metrics[0].value == 0.25 and math.isnan(message.metrics[1].value) and message.metrics[2].value == -math.inf
    assert message.params[0].value == "0.1" and message.tags[0].value == "é ✓"
    with pytest.raises(ValueError, match="out of range"):
        log_batch_body("run", [MetricPoint("loss", 1.0, 1, 2**63)], [], [])
    with pytest.raises(UnicodeEncodeError):
        log_batch_body("run", [], [Param("p", "pl\udce9nts")], [])


def test_the_heartbeat_tag_is_refreshed_while_the_run_lasts(fake, tmp_path, monkeypatch) -> None:
    from plantml.tracking import sender as sending

    monkeypatch.setattr(sending, "HEARTBEAT_INTERVAL_S", 0.2)
    sender = make_sender(fake, tmp_path)
    try:
        deadline = time.monotonic() + 5
        while "plantml.heartbeat" not in fake.tags and time.monotonic() < deadline:
            time.sleep(0.05)
        first = fake.tags["plantml.heartbeat"]
        assert first.endswith("Z") and len(first) == 20  # 2026-11-29T23:05:35Z
    finally:
        sender.stop()
        sender.journal.close()


@pytest.mark.parametrize("status, refused", [(400, True), (413, True), (401, False), (403, False), (404, False), (408, False),
                                             (429, False), (500, False), (503, False)])
def test_an_artifact_the_server_refuses_through_its_proxy_is_a_refusal_not_an_outage(status, refused) -> None:
    import requests

    answer = requests.Response()
    answer.status_code = status  # what MLflow's proxied upload raises: {"error_code": "INVALID_PARAMETER_VALUE", "message": "Invalid path"}
    assert is_refusal(requests.HTTPError(f"{status} Client Error", response=answer)) is refused


def test_the_replay_command_names_a_journal_in_a_folder_with_a_space_quoted_for_the_shell(fake, tmp_path) -> None:
    """A HOME such as ``/home/Jo Smith``: pasted as printed, the command named two files that do not exist."""
    folder = tmp_path / "Jo Smith"
    folder.mkdir()
    sender = make_sender(fake, folder)
    try:
        fake.down = True
        sender.write([MetricPoint("loss", 9.0, 99, 9)])
        report = finish_run(sender, Spool.of_run(folder, "run"), End("FINISHED", 9), timeout=0.3)
    finally:
        sender.stop()
        sender.journal.close()
    assert f"`plantml tracking replay '{folder}/run.jsonl'`" in str(report.error)
