"""Repository-wide pytest setup: tests under tests/integration/ are marked ``integration``.

The stack fixtures themselves come from plantml's pytest plugin (``plantml.testing.plugin``),
loaded through its ``pytest11`` entry point.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INTEGRATION_DIR = Path(__file__).parent / "tests" / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)
