"""The eight checks of a tracking installation, as data: what each verifies and says.

Each check writes through the plantml tracker, then reads the result back through a
plain ``MlflowClient`` and compares; a write that raised nothing is not enough.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One verification step: an id (for tests and scripts), what it checks, its ✓ line."""

    id: str
    title: str
    success: str


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one :class:`Check`: ``ok``, or the one-line ``cause`` of its failure."""

    check: Check
    ok: bool
    cause: str = ""
    seconds: float = 0.0

    @property
    def line(self) -> str:
        """The line a command prints for this result: ``✓ <success>`` or ``✗ <title>: <cause>``."""
        if self.ok:
            return f"✓ {self.check.success}"
        return f"✗ {self.check.title}: {self.cause}"


CONNECTION = Check("connection", "connection to the MLflow server", "MLflow server is ready!")
EXPERIMENT = Check("experiment", "experiment creation", "MLflow tracker initialized")
RUN_START = Check("run_start", "run start", "Test run started")
PARAMS = Check("params", "parameters logging", "Parameters logged")
METRICS = Check("metrics", "metrics logging", "Metrics logged (5 steps)")
ARTIFACT = Check("artifact", "artifact logging", "Artifact logged")
TAGS = Check("tags", "tags setting", "Tags set")
RUN_INFO = Check("run_info", "run information read back", "Run information retrieved")

#: The design's eight checks, in the order they run.
CHECKS: tuple[Check, ...] = (CONNECTION, EXPERIMENT, RUN_START, PARAMS, METRICS, ARTIFACT, TAGS, RUN_INFO)

#: The line printed once every check passed.
ALL_PASSED = "✓ ALL MLFLOW TESTS PASSED"

#: Tag that marks a run as made by ``plantml verify`` (so it can be filtered out).
VERIFICATION_TAG = "plantml.verification"

METRIC_STEPS = 5
