"""The sender without a server: a fake delivery that can be down, or lose its answers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from plantml.settings import TrackingSettings
from plantml.tracking.batching import MetricPoint
from plantml.tracking.delivery import _point_id
from plantml.tracking.journal import read_journal
from plantml.tracking.sender import BufferedWriter, DeliverySettings, take_batch


class FakeDelivery:
    """Stores what it is sent; ``down`` refuses connections, ``lose_answers`` stores then fails."""

    def __init__(self) -> None:
        self.settings = TrackingSettings(tracking_uri="http://127.0.0.1:1", aws_secret_key="s3cr3t-value")
        self.experiment_id = "1"
        self.down = False
        self.lose_answers = 0
        self.points: list[tuple[str, float, int, int]] = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.status: str | None = None
        self.requests_sent = 0

    def _gate(self) -> None:
        if self.down:
            raise ConnectionRefusedError("connection refused")

    def log_batch(self, run_id, metrics, params, tags) -> None:
        self._gate()
        self.requests_sent += 1
        self.points += [(m.key, m.value, m.timestamp, m.step) for m in metrics]
        self.params.update(dict(params))
        self.tags.update(dict(tags))
        if self.lose_answers:
            self.lose_answers -= 1
            raise TimeoutError("read timed out")  # stored, but the client never hears it

    def stored_points(self, run_id, key):
        self._gate()
        return {_point_id(s, t, v) for k, v, t, s in self.points if k == key}

    def stored_params(self, run_id):
        self._gate()
        return dict(self.params)

    def unsent(self, run_id, metrics, params):
        stored = {key: self.stored_points(run_id, key) for key in {m.key for m in metrics}}
        return ([m for m in metrics if _point_id(m.step, m.timestamp, m.value) not in stored[m.key]],
                [(k, v) for k, v in params if k not in self.params])

    def terminate(self, run_id, status, end_time=None) -> None:
        self._gate()
        self.status = status


def points(n: int, key: str = "loss") -> list[MetricPoint]:
    return [MetricPoint(key, float(i), 1_000 + i, i) for i in range(n)]


@pytest.fixture
def fake() -> FakeDelivery:
    return FakeDelivery()


@pytest.fixture
def writer(fake, tmp_path) -> BufferedWriter:
    settings = DeliverySettings(timeout_s=5, max_in_memory=1000, max_backoff_s=0.05, request_timeout_s=0.5,
                                journal_dir=tmp_path / "journal")
    writer = BufferedWriter(fake, settings)  # type: ignore[arg-type]
    yield writer
    writer.close()


def test_logging_returns_at_once_while_the_server_is_down(writer, fake) -> None:
    fake.down = True
    started = time.perf_counter()
    for step in range(200):
        writer.write("run", metrics=[MetricPoint("loss", 1.0, 5, step)])
    assert time.perf_counter() - started < 0.5
    assert not writer.flush(timeout=0.3) and writer.pending() == 200
    fake.down = False
    assert writer.flush(timeout=5)
    assert sorted(p[3] for p in fake.points) == list(range(200))


def test_a_batch_whose_answer_was_lost_is_not_stored_twice(writer, fake) -> None:
    fake.lose_answers = 1
    writer.write("run", metrics=points(50), params=[("lr", "0.1")])
    assert writer.flush(timeout=5)
    assert len(fake.points) == 50 and len(set(fake.points)) == 50
    assert fake.params == {"lr": "0.1"}


def test_small_calls_leave_together_in_few_requests(writer, fake) -> None:
    fake.down = True
    for step in range(2500):
        writer.write("run", metrics=[MetricPoint("loss", 0.5, 7, step)])
    fake.down = False
    assert writer.flush(timeout=10)
    assert fake.requests_sent == 3 and len(fake.points) == 2500


def test_batches_respect_mlflow_limits_and_split_on_a_repeated_key() -> None:
    queue = [{"run": "r", "p": [f"p{i}", "v"]} for i in range(150)]
    assert len(take_batch(queue)) == 100
    queue = [{"run": "r", "t": ["stage", "a"]}, {"run": "r", "m": ["x", 1.0, 1, 0]}, {"run": "r", "t": ["stage", "b"]}]
    assert len(take_batch(queue)) == 2
    queue = [{"run": "r", "m": ["x", 1.0, 1, 0]}, {"run": "r", "end": "FINISHED"}]
    assert len(take_batch(queue)) == 1 and take_batch(queue[1:]) == [queue[1]]


def test_entries_beyond_the_memory_bound_spill_to_disk_and_keep_their_order(fake, tmp_path) -> None:
    settings = DeliverySettings(max_in_memory=10, max_backoff_s=0.05, journal_dir=tmp_path / "journal")
    writer = BufferedWriter(fake, settings)  # type: ignore[arg-type]
    fake.down = True
    for step in range(100):
        writer.write("run", metrics=[MetricPoint("loss", float(step), 10, step)])
    assert writer.in_memory() == 10 and writer.pending() == 100
    assert list((tmp_path / "journal" / "spill").glob("*.jsonl"))
    fake.down = False
    assert writer.flush(timeout=10)
    assert [p[3] for p in fake.points] == list(range(100))
    assert not list((tmp_path / "journal" / "spill").glob("*.jsonl"))
    writer.close()


def test_an_undeliverable_run_is_journalled_in_order_without_secrets(writer, fake) -> None:
    writer.write("run", metrics=points(3), params=[("lr", "0.1")])
    assert writer.flush(timeout=5)
    fake.down = True
    writer.write("run", metrics=[MetricPoint("loss", 9.0, 99, 9)], tags=[("stage", "done")])
    journal = writer.finish("run", "FINISHED", timeout=0.3)
    assert isinstance(journal, Path) and journal.name == "run.jsonl"
    header, entries = read_journal(journal)
    assert header.run_id == "run" and header.tracking_uri == "http://127.0.0.1:1"
    assert entries == [
        {"run": "run", "t": ["stage", "done"]},
        {"run": "run", "m": ["loss", 9.0, 99, 9]},
        {"run": "run", "end": "FINISHED", "at": entries[-1]["at"]},
    ]
    assert "s3cr3t-value" not in journal.read_text()
    assert fake.status is None  # never FINISHED while something is missing


def test_finish_ends_the_run_once_everything_arrived(writer, fake) -> None:
    writer.write("run", metrics=points(5))
    assert writer.finish("run", "FINISHED", timeout=5) is None
    assert fake.status == "FINISHED" and len(fake.points) == 5


@pytest.fixture
def lingering(fake, tmp_path):
    settings = DeliverySettings(timeout_s=5, max_in_memory=1000, max_backoff_s=0.05, request_timeout_s=0.5,
                                journal_dir=tmp_path / "journal", linger_s=0.5)
    writer = BufferedWriter(fake, settings)  # type: ignore[arg-type]
    yield writer
    writer.close()


def test_calls_within_the_linger_leave_in_one_request(lingering, fake) -> None:
    for epoch in range(3):  # three epochs' metrics, logged in quick succession
        lingering.write("run", metrics=[MetricPoint("loss", 1.0 / (epoch + 1), 1000 + epoch, epoch)])
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while len(fake.points) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(fake.points) == 3
    assert fake.requests_sent == 1


def test_a_flush_sends_at_once_without_waiting_for_the_linger(fake, tmp_path) -> None:
    settings = DeliverySettings(timeout_s=5, journal_dir=tmp_path / "journal", linger_s=30)
    writer = BufferedWriter(fake, settings)  # type: ignore[arg-type]
    try:
        writer.write("run", metrics=points(5))
        started = time.monotonic()
        assert writer.flush(timeout=5)
        assert time.monotonic() - started < 2
        assert len(fake.points) == 5
    finally:
        writer.close()
