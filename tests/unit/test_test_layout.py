"""The test tree itself: ``pytest`` from the repository root (``pytest -m gpu``, ``pytest --stack external``) collects it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_modules_share_a_file_name() -> None:
    """tests/ has no ``__init__.py``: pytest's default import mode imports each module by its bare name, so a name used
    in both tests/unit and tests/integration stops a whole-tree collection with "import file mismatch"."""
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
