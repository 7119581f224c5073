"""Repository-wide pytest setup (the plugin marks tests under tests/integration/ ``integration`` and gives the
session a journal folder of its own): the containers backend's own tests are collected only in a ``--stack containers`` session,
the tracking client's fault tests (whole files, or tests marked ``local_session``) only in a
``--stack local`` one.

The stack fixtures themselves come from plantml's pytest plugin (``plantml.testing.plugin``),
loaded through its ``pytest11`` entry point.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INTEGRATION_DIR = Path(__file__).parent / "tests" / "integration"

# As tox sets it, for a pytest run outside tox: MLflow's usage telemetry would reach out of 127.0.0.1 (CI=true turns it
# off by itself), and its thread unsets _MLFLOW_TELEMETRY_SESSION_ID in os.environ at a moment of its own
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def pytest_configure(config: pytest.Config) -> None:
    # One CPU thread per test process (as torchrun gives each rank): two xdist workers on CI's two cores each ran
    # trainings on two OpenMP threads, whose spinning starved the other worker (a training suite: 87 s -> 43 s).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _refuse_files_of_another_backend(config)
    config.addinivalue_line("markers", "local_session: a test of the client that the local backend's session runs "
                                       "(another backend would only repeat it, slower); not collected elsewhere")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--stack") != "local":  # deselected, not skipped: this session has nothing to say on them
        elsewhere = [item for item in items if item.get_closest_marker("local_session")]
        if elsewhere:
            config.hook.pytest_deselected(items=elsewhere)
            items[:] = [item for item in items if not item.get_closest_marker("local_session")]


CONTAINERS_ONLY = {INTEGRATION_DIR / "test_containers.py"}
#: Integration tests whose subject is the client, not the stack (the UI of a local store, torchrun ranks, signals,
#: faults injected by a proxy, bad values and bad command lines, each tracker method, the registered model as a module, journals replayed, a full disk): the local backend's session runs them;
#: another backend would only repeat them, slower.
LOCAL_SESSION_ONLY = {INTEGRATION_DIR / name for name in (
    "test_ui.py", "test_train_distributed.py", "test_signals.py", "test_delivery_faults.py", "test_bad_values.py",
    "test_journal_recovery.py", "test_journal_disk_full.py", "test_bad_input.py",
    "test_tracker_methods.py", "test_models_usable.py",
)}


def _only_backend(path: Path) -> str | None:
    """The one backend whose session runs the module at ``path``; None where every session does."""
    if path in CONTAINERS_ONLY:
        return "containers"
    if path in LOCAL_SESSION_ONLY:
        return "local"
    return None


def _refuse_files_of_another_backend(config: pytest.Config) -> None:
    """A module named on the command line is collected whatever pytest_ignore_collect says: its tests then failed on
    the wrong backend's stack (``'HostProcess' object has no attribute 'docker_container'``). Say which they need."""
    backend = config.getoption("--stack")
    for arg in config.args:
        only = _only_backend((config.invocation_params.dir / arg.split("::")[0]).resolve())
        if only is None or only == backend:
            continue
        if only == "containers":
            raise pytest.UsageError(f"{arg}: the containers backend's own tests: run them with --stack containers")
        raise pytest.UsageError(f"{arg}: tests of the client that only a --stack local session runs")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # Not collected rather than skipped: a session on another backend has nothing to say about them.
    only = _only_backend(collection_path)
    return True if only is not None and only != config.getoption("--stack") else None
