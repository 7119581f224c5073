"""The test tree itself: ``pytest`` from the repository root (``pytest -m gpu``, ``pytest --stack external``) collects it."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_modules_share_a_file_name() -> None:
    """tests/ has no ``__init__.py``: pytest's default import mode imports each module by its bare name, so a name used
    in both tests/unit and tests/integration stops a whole-tree collection with "import file mismatch"."""
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []


def test_the_session_journals_into_a_folder_of_its_own_even_when_the_user_named_one(tmp_path, monkeypatch) -> None:
    """A developer's $PLANTML_JOURNAL_DIR holds their real journals: the tests' recoveries must never see them
    (the plugin's doing, so that any project's sessions get it)."""
    import types

    from plantml.testing import plugin

    theirs = tmp_path / "their-journals"
    monkeypatch.setenv("PLANTML_JOURNAL_DIR", str(theirs))
    config = types.SimpleNamespace(addinivalue_line=lambda *args: None, getoption=lambda name: None)

    plugin.pytest_configure(config)
    ours = Path(os.environ["PLANTML_JOURNAL_DIR"])
    plugin.pytest_unconfigure(config)

    assert ours != theirs and ours.name.startswith(".plantml-test-journal.staging-") and not ours.exists()
    assert os.environ["PLANTML_JOURNAL_DIR"] == str(theirs)  # the user's setting again once the session ends


def test_a_module_of_another_backend_named_on_the_command_line_is_one_usage_error_naming_it() -> None:
    """pytest collects a module named on its command line whatever the conftest ignores: the containers backend's own
    tests then ran on a local stack and failed with ``'HostProcess' object has no attribute 'docker_container'``."""
    import subprocess
    import sys

    def collect(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *args],
                              cwd=TESTS.parent, capture_output=True, text=True, timeout=300)

    refused = collect("tests/integration/test_containers.py", "--stack", "local")
    assert refused.returncode == 4 and refused.stderr.strip() == (
        "ERROR: tests/integration/test_containers.py: the containers backend's own tests: run them with --stack containers")
    refused = collect("tests/integration/test_ui.py::test_a_closed_terminal_or_sigterm_stops_plantml_ui_and_its_server",
                      "--stack", "containers")
    assert refused.returncode == 4 and "tests of the client that only a --stack local session runs" in refused.stderr
    assert collect("tests/integration/test_containers.py", "--stack", "containers").returncode == 0
