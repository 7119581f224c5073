"""Experiment tracking: :class:`MLflowTracker`, the design's wrapper around MLflow.

Importing this package does not import mlflow; the tracker does so on construction.
"""

from __future__ import annotations

from plantml.tracking.batching import BatchWriter, MetricPoint, chunk_batch
from plantml.tracking.sender import BufferedWriter, DeliveryPending, DeliverySettings
from plantml.tracking.tracker import MLflowTracker, PendingModel, TrackedRun, flatten_run
from plantml.tracking.validation import NonFiniteMetricWarning, TruncatedValueWarning

__all__ = [
    "BatchWriter",
    "BufferedWriter",
    "DeliveryPending",
    "DeliverySettings",
    "MLflowTracker",
    "MetricPoint",
    "NonFiniteMetricWarning",
    "PendingModel",
    "TrackedRun",
    "TruncatedValueWarning",
    "chunk_batch",
    "flatten_run",
]
