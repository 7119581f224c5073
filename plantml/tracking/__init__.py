"""Experiment tracking: :class:`MLflowTracker`, the design's wrapper around MLflow.

Importing this package does not import mlflow; the tracker does so on construction.
The write path under it: :mod:`~plantml.tracking.entries` (what is logged, typed),
:mod:`~plantml.tracking.journal` (the write-ahead log on local disk),
:mod:`~plantml.tracking.sender` (the background thread), :mod:`~plantml.tracking.transport`
(one delivery function, one retry policy, exactly once), :mod:`~plantml.tracking.recover`
(journals of processes that died, runs whose heartbeat stopped).
"""

from __future__ import annotations

from plantml.tracking.entries import MetricPoint
from plantml.tracking.runs import PendingModel, TrackedRun, flatten_run
from plantml.tracking.sender import DeliveryPending, DeliverySettings
from plantml.tracking.tracker import MLflowTracker
from plantml.tracking.validation import NonFiniteMetricWarning, TruncatedValueWarning

__all__ = [
    "DeliveryPending",
    "DeliverySettings",
    "MLflowTracker",
    "MetricPoint",
    "NonFiniteMetricWarning",
    "PendingModel",
    "TrackedRun",
    "TruncatedValueWarning",
    "flatten_run",
]
