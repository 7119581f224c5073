"""Chunking: whatever the input size, every request stays within MLflow's log_batch limits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from plantml.tracking.batching import BatchWriter, MetricPoint, chunk_batch
from plantml.tracking.validation import (
    MAX_BATCH_LOG_REQUEST_SIZE,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)


def _metrics(n: int) -> list[MetricPoint]:
    return [MetricPoint(f"m{i % 100}", float(i), 1_700_000_000_000, i // 100) for i in range(n)]


def _pairs(prefix: str, n: int, value_len: int) -> list[tuple[str, str]]:
    return [(f"{prefix}{i}", "v" * value_len) for i in range(n)]


def _request_bytes(batch) -> int:
    return sum(len(m.key) + 40 for m in batch.metrics) + sum(len(k) + len(v) + 20 for k, v in batch.params + batch.tags)


@settings(max_examples=60, deadline=None)
@given(
    n_metrics=st.integers(0, 5000),
    n_params=st.integers(0, 450),
    n_tags=st.integers(0, 450),
    value_len=st.sampled_from([1, 100, 6000, 8000]),
)
def test_chunks_never_exceed_the_limits(n_metrics: int, n_params: int, n_tags: int, value_len: int) -> None:
    metrics, params, tags = _metrics(n_metrics), _pairs("p", n_params, value_len), _pairs("t", n_tags, value_len)
    chunks = list(chunk_batch(metrics, params, tags))
    for chunk in chunks:
        assert len(chunk.metrics) <= MAX_METRICS_PER_BATCH
        assert len(chunk.params) <= MAX_PARAMS_TAGS_PER_BATCH
        assert len(chunk.tags) <= MAX_PARAMS_TAGS_PER_BATCH
        assert 0 < len(chunk) <= MAX_ENTITIES_PER_BATCH
        assert _request_bytes(chunk) < MAX_BATCH_LOG_REQUEST_SIZE
    assert [m for c in chunks for m in c.metrics] == metrics
    assert [p for c in chunks for p in c.params] == params
    assert [t for c in chunks for t in c.tags] == tags


def test_small_writes_take_one_request() -> None:
    assert len(list(chunk_batch(_metrics(100), _pairs("p", 10, 5), _pairs("t", 10, 5)))) == 1


def test_ten_thousand_points_take_ten_requests() -> None:
    assert len(list(chunk_batch(_metrics(10_000)))) == 10


def test_nothing_to_write_makes_no_request() -> None:
    assert list(chunk_batch()) == []


class _RecordingClient:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self.calls.append({"run_id": run_id, "metrics": metrics, "params": params, "tags": tags})


def test_writer_sends_one_log_batch_per_chunk_with_mlflow_entities() -> None:
    client = _RecordingClient()
    writer = BatchWriter(client, "http://127.0.0.1:1")
    writer.write("run1", metrics=_metrics(2500), params=_pairs("p", 150, 3), tags=[("a", "1"), ("a", "2")])
    assert writer.requests_sent == len(client.calls) == 3
    first = client.calls[0]
    assert len(first["params"]) == 100 and len(first["tags"]) == 1 and len(first["metrics"]) == 899
    assert first["metrics"][0].key == "m0" and first["metrics"][0].timestamp == 1_700_000_000_000
    tags = [t for call in client.calls for t in call["tags"]]
    assert [(t.key, t.value) for t in tags] == [("a", "2")]


def test_writer_error_is_a_tracking_error_naming_the_uri() -> None:
    import pytest

    from plantml.errors import TrackingError

    class Failing:
        def log_batch(self, *args, **kwargs):
            raise ConnectionError("refused\nmore lines")

    with pytest.raises(TrackingError, match=r"http://127.0.0.1:1: log_batch for run r failed: refused$"):
        BatchWriter(Failing(), "http://127.0.0.1:1").write("r", metrics=_metrics(1))
