"""The eight checks as data, and how a result reads on the command line."""

from __future__ import annotations

from plantml.verification import ALL_PASSED, CHECKS, CheckResult
from plantml.verification.checks import CONNECTION

DESIGN_LINES = [
    "MLflow server is ready!",
    "MLflow tracker initialized",
    "Test run started",
    "Parameters logged",
    "Metrics logged (5 steps)",
    "Artifact logged",
    "Tags set",
]


def test_there_are_eight_checks_in_the_design_order() -> None:
    assert [c.id for c in CHECKS] == ["connection", "experiment", "run_start", "params", "metrics", "artifact", "tags", "run_info"]


def test_the_first_seven_success_lines_are_the_designs_verbatim() -> None:
    assert [c.success for c in CHECKS[:7]] == DESIGN_LINES
    assert CHECKS[7].success == "Run information retrieved"
    assert ALL_PASSED == "✓ ALL MLFLOW TESTS PASSED"


def test_a_passed_check_reads_as_a_tick_line() -> None:
    assert CheckResult(CONNECTION, True).line == "✓ MLflow server is ready!"


def test_a_failed_check_reads_as_a_cross_with_its_cause() -> None:
    result = CheckResult(CONNECTION, False, "http://127.0.0.1:1 unreachable")
    assert result.line == "✗ connection to the MLflow server: http://127.0.0.1:1 unreachable"
