"""Experiment tracking: :class:`MLflowTracker`, the design's wrapper around MLflow.

Importing this package does not import mlflow; the tracker does so on construction.
"""

from __future__ import annotations

from plantml.tracking.batching import BatchWriter, MetricPoint, chunk_batch
from plantml.tracking.tracker import MLflowTracker, TrackedRun, flatten_run
from plantml.tracking.validation import NonFiniteMetricWarning, TruncatedValueWarning

__all__ = [
    "BatchWriter",
    "MLflowTracker",
    "MetricPoint",
    "NonFiniteMetricWarning",
    "TrackedRun",
    "TruncatedValueWarning",
    "chunk_batch",
    "flatten_run",
]
