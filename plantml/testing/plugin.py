"""pytest plugin: the real tracking stack as session-scoped fixtures.

Installed with plantml (``pytest11`` entry point), so downstream projects get:

- ``mlflow_stack``: the stack in the design's ``direct`` artifact mode, started once per session;
- ``mlflow_stack_any_mode``: the same test run against each artifact mode (``direct``, ``proxied``);
- ``private_mlflow_stack``: a stack of the same backend for one module, to break on purpose;
- ``tracking_uri``, ``s3_client``, ``mlflow_client``, ``mlflow_env`` and ``experiment_name``;
- ``--stack local|containers|external`` to choose the backend (also ``$PLANTML_STACK``); for
  ``containers``, ``--postgres-image``, ``--s3-image``, ``--mlflow-image`` and ``--s3-flavour``
  (also ``$PLANTML_POSTGRES_IMAGE``, ``$PLANTML_S3_IMAGE``, ``$PLANTML_MLFLOW_IMAGE``, ``$PLANTML_S3_FLAVOUR``);
- the markers ``integration``, ``gpu`` (skipped with a reason where CUDA is absent) and ``slow``.

A stack that cannot start makes the tests that need it fail with the cause; it never skips them.
"""

from __future__ import annotations

import re
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from plantml.settings import env_value
from plantml.stack import ARTIFACT_MODES, BACKENDS, ArtifactMode, Stack, make_stack

# Backends whose stacks plantml starts itself, in either artifact mode.
OWN_BACKENDS = ("local", "containers")

MARKERS = {
    "integration": "needs the real tracking stack (PostgreSQL, S3, MLflow server)",
    "gpu": "needs a CUDA device; skipped with a reason where there is none",
    "slow": "takes more than a few seconds",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("plantml", "plantml tracking stack")
    group.addoption(
        "--stack", choices=BACKENDS, default=env_value("PLANTML_STACK"),
        help="backend of the mlflow_stack fixtures: local processes, Docker containers, or an external stack "
             "from the environment (default: $PLANTML_STACK or local)",
    )
    for option, variable, what in CONTAINER_OPTIONS:
        group.addoption(option, default=None, help=f"containers backend: {what} (default: ${variable} or plantml's own)")


# pytest option, environment variable, what it sets: the containers backend's settings.
CONTAINER_OPTIONS = (
    ("--postgres-image", "PLANTML_POSTGRES_IMAGE", "the PostgreSQL image"),
    ("--s3-image", "PLANTML_S3_IMAGE", "the object store's image"),
    ("--mlflow-image", "PLANTML_MLFLOW_IMAGE", "the MLflow server image"),
    ("--s3-flavour", "PLANTML_S3_FLAVOUR", "the object store, seaweedfs or minio"),
)


def _backend_options(config: pytest.Config) -> dict[str, Any]:
    """The keyword arguments of ``make_stack`` for the chosen backend (the image overrides)."""
    if config.getoption("--stack") != "containers":
        return {}
    names = {"--postgres-image": "postgres_image", "--s3-image": "s3_image", "--mlflow-image": "mlflow_image",
             "--s3-flavour": "s3_flavour"}
    return {names[option]: config.getoption(option) for option, _, _ in CONTAINER_OPTIONS if config.getoption(option)}


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    _teardown_on_sigterm()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _teardown_on_sigterm() -> None:
    """Treat SIGTERM (a CI timeout, ``kill``) like Ctrl-C, so the session's stacks are torn down.

    By default SIGTERM ends Python at once: no fixture teardown, no atexit, and the
    stack's processes would outlive the session.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _cuda_skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "gpu test: torch is not installed"
    if not torch.cuda.is_available():
        return "gpu test: no CUDA device available (torch.cuda.is_available() is False)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = _cuda_skip_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mlflow_stack_any_mode" in metafunc.fixturenames:
        # An external stack has the one artifact mode it was started with.
        modes = ARTIFACT_MODES if metafunc.config.getoption("--stack") in OWN_BACKENDS else ("external",)
        metafunc.parametrize("mlflow_stack_any_mode", modes, indirect=True)


class StackPool:
    """The session's stacks, one per artifact mode, started on first use and stopped at the end.

    A start failure is remembered, so every test that needs that stack fails with the
    same cause at once instead of trying again.
    """

    def __init__(self, backend: str, **options: Any) -> None:
        self.backend = backend
        self.options = options
        self._stacks: dict[str, Stack] = {}
        self._failures: dict[str, BaseException] = {}

    def get(self, mode: str) -> Stack:
        if mode in self._failures:
            raise self._failures[mode]
        if mode not in self._stacks:
            try:
                artifact_mode = mode if self.backend in OWN_BACKENDS else "direct"
                stack = make_stack(self.backend, artifact_mode, **self.options)  # type: ignore[arg-type]
                self._stacks[mode] = stack.start()
            except BaseException as exc:
                self._failures[mode] = exc
                raise
        return self._stacks[mode]

    def stop_all(self) -> None:
        for stack in self._stacks.values():
            stack.stop()
        self._stacks.clear()


@pytest.fixture(scope="session")
def _plantml_stack_pool(request: pytest.FixtureRequest) -> Iterator[StackPool]:
    pool = StackPool(request.config.getoption("--stack"), **_backend_options(request.config))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def mlflow_stack(_plantml_stack_pool: StackPool, request: pytest.FixtureRequest) -> Stack:
    """The tracking stack in ``direct`` artifact mode (or the external one), shared by the session."""
    mode: ArtifactMode | str = "direct" if _plantml_stack_pool.backend in OWN_BACKENDS else "external"
    return _plantml_stack_pool.get(mode)


@pytest.fixture(scope="session")
def mlflow_stack_any_mode(_plantml_stack_pool: StackPool, request: pytest.FixtureRequest) -> Stack:
    """The stack in each artifact mode in turn: a test using it runs once per mode."""
    return _plantml_stack_pool.get(request.param)


@pytest.fixture(scope="module")
def private_mlflow_stack(_plantml_stack_pool: StackPool) -> Iterator[Stack]:
    """A stack of the session's backend for one test module alone: for tests that stop,
    restart or otherwise break its services on purpose. Started for the module, stopped after it."""
    if _plantml_stack_pool.backend not in OWN_BACKENDS:
        pytest.fail(f"private_mlflow_stack needs a backend plantml starts ({', '.join(OWN_BACKENDS)}), "
                    f"not {_plantml_stack_pool.backend!r}")
    with make_stack(_plantml_stack_pool.backend, "direct", **_plantml_stack_pool.options) as stack:  # type: ignore[arg-type]
        yield stack


@pytest.fixture(scope="session")
def tracking_uri(mlflow_stack: Stack) -> str:
    """The tracking server URL of ``mlflow_stack``."""
    return mlflow_stack.tracking_uri


@pytest.fixture(scope="session")
def s3_client(mlflow_stack: Stack) -> Any:
    """A boto3 client for the object store of ``mlflow_stack``."""
    return mlflow_stack.s3_client()


@pytest.fixture
def mlflow_client(mlflow_stack: Stack) -> Any:
    """A plain ``mlflow.MlflowClient`` on ``mlflow_stack``: read results back without plantml."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=mlflow_stack.tracking_uri)


@pytest.fixture
def mlflow_env(mlflow_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """Point MLflow's and boto3's environment variables at ``mlflow_stack`` for one test."""
    for name, value in mlflow_stack.client_env().items():
        monkeypatch.setenv(name, value)
    return mlflow_stack


@pytest.fixture
def experiment_name(request: pytest.FixtureRequest) -> str:
    """A fresh experiment name for one test (created by whoever first uses it)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    return f"test_{stem}_{uuid.uuid4().hex[:8]}"
