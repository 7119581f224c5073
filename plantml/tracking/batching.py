"""The tracker's write path: params, metrics and tags leave through ``log_batch`` only.

:func:`chunk_batch` packs entries into requests that respect MLflow's limits (100 params,
100 tags, 1000 metrics, 1000 entities, 1 MB per request). :class:`BatchWriter` sends each
chunk with one ``MlflowClient.log_batch`` call. Every write goes through one writer
object so that a buffered writer (queue, background sender, journal) can replace this
synchronous one without touching :class:`~plantml.tracking.MLflowTracker`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from plantml.errors import TrackingError
from plantml.tracking.validation import (
    MAX_BATCH_LOG_REQUEST_SIZE,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

# Room left for the JSON envelope of a request and each entry's field names.
_REQUEST_SIZE_BUDGET = int(MAX_BATCH_LOG_REQUEST_SIZE * 0.9)
_ENTRY_OVERHEAD = 96


@dataclass(frozen=True)
class MetricPoint:
    """One metric value, with the timestamp (ms since the epoch) and step it was logged at."""

    key: str
    value: float
    timestamp: int
    step: int


@dataclass
class Batch:
    """What one ``log_batch`` request carries."""

    metrics: list[MetricPoint] = field(default_factory=list)
    params: list[tuple[str, str]] = field(default_factory=list)
    tags: list[tuple[str, str]] = field(default_factory=list)
    size: int = 0

    def __len__(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    def fits(self, kind: str, size: int) -> bool:
        """True when one more entry of ``kind`` and ``size`` bytes stays within MLflow's limits."""
        if len(self) + 1 > MAX_ENTITIES_PER_BATCH or self.size + size > _REQUEST_SIZE_BUDGET:
            return not len(self)
        if kind == "metrics":
            return len(self.metrics) < MAX_METRICS_PER_BATCH
        return len(getattr(self, kind)) < MAX_PARAMS_TAGS_PER_BATCH


def _entry_size(kind: str, entry: Any) -> int:
    if kind == "metrics":
        return len(entry.key.encode()) + _ENTRY_OVERHEAD
    key, value = entry
    return len(key.encode()) + len(value.encode()) + _ENTRY_OVERHEAD


def chunk_batch(
    metrics: Iterable[MetricPoint] = (),
    params: Iterable[tuple[str, str]] = (),
    tags: Iterable[tuple[str, str]] = (),
) -> list[Batch]:
    """Pack entries into as few requests as MLflow accepts, keeping each kind in its order.

    Each kind fills the earliest request that still has room for it (params and tags
    share requests with metrics, as MLflow's own client does) and never goes back to an
    earlier one, so the entries of one kind keep the order they were logged in.
    """
    chunks: list[Batch] = []
    for kind, entries in (("params", params), ("tags", tags), ("metrics", metrics)):
        index = 0
        for entry in entries:
            size = _entry_size(kind, entry)
            while index < len(chunks) and not chunks[index].fits(kind, size):
                index += 1
            if index == len(chunks):
                chunks.append(Batch())
            getattr(chunks[index], kind).append(entry)
            chunks[index].size += size
    return chunks


class Writer(Protocol):
    """What the tracker needs from its write path (a buffered writer implements the same)."""

    def write(
        self,
        run_id: str,
        metrics: Sequence[MetricPoint] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Send (or queue) these entries for ``run_id``."""

    def flush(self, run_id: str | None = None) -> None:
        """Return once everything written so far (for ``run_id``, or all runs) is on the server."""

    def close(self) -> None:
        """Flush and release resources."""


class BatchWriter:
    """Synchronous writer: each :meth:`write` sends its chunks with ``log_batch`` before returning."""

    def __init__(self, client: Any, tracking_uri: str) -> None:
        self._client = client
        self._tracking_uri = tracking_uri
        self.requests_sent = 0

    def write(
        self,
        run_id: str,
        metrics: Sequence[MetricPoint] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Send the entries in as few ``log_batch`` requests as MLflow's limits allow."""
        from mlflow.entities import Metric, Param, RunTag

        for chunk in chunk_batch(metrics, params, _last_value_per_key(tags)):
            try:
                self._client.log_batch(
                    run_id,
                    metrics=[Metric(m.key, m.value, m.timestamp, m.step) for m in chunk.metrics],
                    params=[Param(k, v) for k, v in chunk.params],
                    tags=[RunTag(k, v) for k, v in chunk.tags],
                    synchronous=True,
                )
            except Exception as exc:  # MlflowException, requests errors: one message for all
                raise TrackingError(f"{self._tracking_uri}: log_batch for run {run_id} failed: {_one_line(exc)}") from exc
            self.requests_sent += 1

    def flush(self, run_id: str | None = None) -> None:
        """Nothing is buffered: every write has reached the server when it returns."""

    def close(self) -> None:
        """Nothing to release."""


def _last_value_per_key(tags: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    # One request may not set a key twice; the last value is the one the caller meant.
    return list(dict(tags).items())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]
