"""How the sender cuts its journal into requests: the records one request carries, and a record in words.

A batch holds consecutive params, metrics and tags up to MLflow's limits (1000 metrics,
100 params, 100 tags, 1000 entries, about 1 MB); an artifact, a model or the run's end
goes alone. Delivered artifacts' and models' spooled copies are removed here too.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from plantml.tracking.entries import Artifact, DatasetInput, Entry, MetricPoint, Model, Param, Record, Tag
from plantml.tracking.validation import (
    MAX_BATCH_LOG_REQUEST_SIZE,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

# Room left for the JSON envelope of a request and each entry's field names.
_REQUEST_SIZE_BUDGET = int(MAX_BATCH_LOG_REQUEST_SIZE * 0.9)
_ENTRY_OVERHEAD = 96


def _entry_size(entry: Entry) -> int:
    if isinstance(entry, MetricPoint):
        return len(entry.key) + _ENTRY_OVERHEAD
    return len(entry.key) + len(entry.value) + _ENTRY_OVERHEAD  # type: ignore[union-attr]


def take_batch(records: Sequence[Record]) -> list[Record]:
    """The records at the front that one request can carry, in order.

    An artifact, a model or an end goes alone. Otherwise consecutive params, tags and
    metrics are taken up to MLflow's limits; a param repeated starts the next request. A tag
    set again joins the batch (the transport sends its last value only: a tag keeps no
    history), so a tag set every step does not cut the batches down to one step each.
    """
    if not records[0].is_log:
        return [records[0]]
    batch: list[Record] = []
    counts: dict[type, int] = {}
    keys: set[tuple[type, str]] = set()
    size = 0
    for record in records[:MAX_ENTITIES_PER_BATCH]:
        if not record.is_log:
            break
        kind = type(record.entry)
        limit = MAX_METRICS_PER_BATCH if kind is MetricPoint else MAX_PARAMS_TAGS_PER_BATCH
        entry_size = _entry_size(record.entry)
        if counts.get(kind, 0) >= limit or (batch and size + entry_size > _REQUEST_SIZE_BUDGET):
            break
        key = (kind, getattr(record.entry, "key", ""))
        if kind is Tag and key in keys:  # replaces the earlier value in the request
            size += entry_size
            batch.append(record)
            continue
        if kind is Param and key in keys:
            break
        keys.add(key)
        counts[kind] = counts.get(kind, 0) + 1
        size += entry_size
        batch.append(record)
    return batch


def describe(record: Record) -> str:
    """A record in words for a log line: ``param 'lr'``, ``metric 'loss' at step 3``."""
    entry = record.entry
    if isinstance(entry, MetricPoint):
        return f"metric {entry.key!r} at step {entry.step}"
    if isinstance(entry, (Param, Tag)):
        return f"{type(entry).__name__.lower()} {entry.key!r}"
    if isinstance(entry, Model):
        return f"model {entry.name!r}"
    if isinstance(entry, Artifact):
        return f"artifact {Path(entry.src).name!r}"
    if isinstance(entry, DatasetInput):
        return f"data set {entry.name!r}"
    return f"the run's end ({entry.status})"


def discard_spooled(records: Sequence[Record]) -> None:
    """Remove the spooled files or folders of delivered artifacts and models."""
    for record in records:
        if not isinstance(record.entry, (Artifact, Model)):
            continue
        path = Path(record.entry.src)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
