"""plantml: train plant-image classifiers with trustworthy MLflow experiment tracking.

``from plantml import MLflowTracker`` works; heavy modules (mlflow, torch) are imported
only when first used.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("plantml")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

_LAZY = {
    "MLflowTracker": "plantml.tracking",
    "TrackingSettings": "plantml.settings",
    "resolve_tracking_settings": "plantml.settings",
    "PlantmlError": "plantml.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'plantml' has no attribute {name!r}")
