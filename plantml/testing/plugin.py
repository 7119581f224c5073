"""pytest plugin: the real tracking stack as session-scoped fixtures.

Installed with plantml (``pytest11`` entry point), so downstream projects get:

- ``mlflow_stack``: the stack in the design's ``direct`` artifact mode, started once per session;
- ``mlflow_stack_any_mode``: the same test run against each artifact mode (``direct``, ``proxied``);
- ``private_mlflow_stack``: a stack of the same backend for one module, to break on purpose;
- ``mlflow_stack_factory``: more stacks of the same backend with options of their own (a data folder, auth…);
- ``tracking_uri``, ``s3_client``, ``mlflow_client``, ``mlflow_env`` and ``experiment_name``;
- ``--stack local|containers|external`` to choose the backend (also ``$PLANTML_STACK``); an option
  for each setting of the containers backend and the object store's flavour (``--postgres-image``,
  ``--s3-flavour``…), made from the rows of ``plantml.settings.VARIABLES`` with their defaults;
- ``--stack-fast``: the shared stacks without durability (private stacks stay durable);
- the markers ``integration``, ``gpu`` (skipped with a reason where CUDA is absent) and ``slow``.

A stack that cannot start makes the tests that need it fail with the cause; it never skips them.
Until one of its stack fixtures starts a stack, the plugin only gives the session a journal folder of
its own (a temporary ``PLANTML_JOURNAL_DIR``, removed at the end, or by a later plantml process when the
session was killed with ``kill -9``); then SIGTERM tears the session's stacks
down, like Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from plantml.errors import PlantmlError
from plantml.settings import VARIABLES, Variable, bypass_proxies_for_loopback, env_value
from plantml.stack import ARTIFACT_MODES, BACKENDS, ArtifactMode, ManagedStack, Stack, make_stack
from plantml.stack.s3 import S3_FLAVOURS
from plantml.staging import scratch_folder

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
        help=f"{VARIABLES['PLANTML_STACK'].help} (default: $PLANTML_STACK or {VARIABLES['PLANTML_STACK'].default})",
    )
    for variable in STACK_OPTIONS:
        group.addoption(option_name(variable), default=env_value(variable.name),
                        help=f"{variable.help} (default: ${variable.name} or plantml's own)")
    group.addoption("--stack-fast", action="store_true",
                    help="the session's shared stacks without fsync or synchronous commit (faster, not durable); "
                         "private stacks, which tests break on purpose, stay durable")


#: The settings of a stack backend that a session may choose: the containers backend's rows of
#: plantml.settings.VARIABLES, and the object store's flavour.
STACK_OPTIONS = (*(v for v in VARIABLES.values() if v.group == "containers"), VARIABLES["PLANTML_S3_FLAVOUR"])


def option_name(variable: Variable) -> str:
    """``PLANTML_POSTGRES_IMAGE`` -> ``--postgres-image``."""
    return "--" + variable.name.removeprefix("PLANTML_").lower().replace("_", "-")


def _backend_options(config: pytest.Config) -> dict[str, Any]:
    """The keyword arguments of ``make_stack`` for the chosen backend: the flavour, and the images for containers."""
    values = {variable.name.removeprefix("PLANTML_").lower(): config.getoption(option_name(variable))
              for variable in STACK_OPTIONS}
    values = {name: value for name, value in values.items() if value}
    options: dict[str, Any] = {}
    if config.getoption("--stack") in OWN_BACKENDS and "s3_flavour" in values:
        options["s3_flavour"] = values.pop("s3_flavour")
    if config.getoption("--stack") == "containers":
        options["images"] = {name: value for name, value in values.items() if name != "s3_flavour"}
    return options


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    # argparse checks choices on the command line only, not on a default taken from $PLANTML_STACK
    backend = config.getoption("--stack")
    if backend is not None and backend not in BACKENDS:
        raise pytest.UsageError(f"PLANTML_STACK={backend!r}: expected one of {', '.join(BACKENDS)} (or give --stack)")
    flavour = config.getoption(option_name(VARIABLES["PLANTML_S3_FLAVOUR"]))
    if flavour and flavour not in S3_FLAVOURS:  # else every stack test errors at its setup, one by one
        raise pytest.UsageError(f"--s3-flavour {flavour!r}: expected one of {', '.join(S3_FLAVOURS)}")
    # The session's runs journal into a folder of its own, not the user's ~/.cache/plantml/journal nor a
    # $PLANTML_JOURNAL_DIR of theirs: a run a test leaves undelivered is then never retried by the user's next
    # tracker (against a stack long gone, or another on the same port), and the tests' recoveries never touch
    # the user's journals. A staging folder named after this process: what a session killed with -9 left there
    # is swept by the next plantml process that needs a temporary folder.
    scope = contextlib.ExitStack()
    try:
        journal = scope.enter_context(scratch_folder("plantml-test-journal"))
    except PlantmlError as exc:  # a temporary folder that is full or read-only: one line, not a traceback
        raise pytest.UsageError(f"the session's journal folder: {exc}") from None
    environ = scope.enter_context(pytest.MonkeyPatch.context())  # puts the user's value back at the end
    environ.setenv("PLANTML_JOURNAL_DIR", str(journal))
    # A proxy of the machine's (a CI runner's) would get the tests' traffic to 127.0.0.1, their subprocesses' too
    for name, value in bypass_proxies_for_loopback(dict(os.environ)).items():
        environ.setenv(name, value)
    config._plantml_scope = scope  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    scope = getattr(config, "_plantml_scope", None)
    if scope is not None:
        scope.close()
    _give_back_sigterm()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _teardown_on_sigterm() -> None:
    """Treat SIGTERM (a CI timeout, ``kill``) and SIGHUP like Ctrl-C, so the session's stacks are torn down.

    Installed when a stack fixture first starts a stack, never before: a session that
    uses no stack keeps its SIGTERM as it was. By default SIGTERM ends Python at once:
    no fixture teardown, no atexit, and the stack's services would outlive the session
    (its processes get their parent-death signal, its containers their reaper, but the
    temporary folder would stay until the next prune).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal that ran pytest closed
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _interrupt)


def _give_back_sigterm() -> None:
    """At the session's end, SIGTERM and SIGHUP as they were before :func:`_teardown_on_sigterm`: a session run
    inside a longer process (``pytest.main`` from an IDE or a script, pytester) must not leave them raising there."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is _interrupt:
            signal.signal(signum, signal.SIG_DFL)


def _cuda_skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "gpu test: torch is not installed"
    if not torch.cuda.is_available():
        return "gpu test: no CUDA device available (torch.cuda.is_available() is False)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration = config.rootpath / "tests" / "integration"
    for item in items:
        if integration in item.path.parents:
            item.add_marker(pytest.mark.integration)
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
            _teardown_on_sigterm()
            try:
                artifact_mode = mode if self.backend in OWN_BACKENDS else "direct"
                stack = make_stack(self.backend, artifact_mode, **self.options)  # type: ignore[arg-type]
                self._stacks[mode] = stack.start()
            except BaseException as exc:
                self._failures[mode] = exc
                raise
        return self._stacks[mode]

    def stop_all(self) -> None:
        if self._stacks:
            end_open_runs()
        for stack in self._stacks.values():
            stack.stop()
        self._stacks.clear()


def end_open_runs() -> None:
    """End KILLED the runs that tests left open (a test failed between ``start_run`` and ``end_run``), before
    their stacks stop: at exit they would retry a stopped server for the delivery timeout (60 s) and leave
    their journals behind."""
    from plantml.tracking.open_runs import end_abandoned_runs

    end_abandoned_runs()


@pytest.fixture(scope="session")
def _plantml_stack_pool(request: pytest.FixtureRequest) -> Iterator[StackPool]:
    options = _backend_options(request.config)
    if request.config.getoption("--stack-fast") and request.config.getoption("--stack") in OWN_BACKENDS:
        options["durable"] = False
    pool = StackPool(request.config.getoption("--stack"), **options)
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


@pytest.fixture(scope="session")
def mlflow_stack_factory(_plantml_stack_pool: StackPool) -> Iterator[Callable[..., ManagedStack]]:
    """Make unstarted stacks of the session's backend (its images and flavour), with any option of
    :class:`plantml.stack.ManagedStack` (``data_dir``, ``auth``, ``durable``…). Durable unless asked;
    each stack it made is stopped at the end of the session if it still runs."""
    if _plantml_stack_pool.backend not in OWN_BACKENDS:
        pytest.fail(f"stacks of their own need a backend plantml starts ({', '.join(OWN_BACKENDS)}), "
                    f"not {_plantml_stack_pool.backend!r}")
    made: list[ManagedStack] = []
    base = {name: value for name, value in _plantml_stack_pool.options.items() if name != "durable"}

    def make(artifact_mode: ArtifactMode = "direct", **options: Any) -> ManagedStack:
        _teardown_on_sigterm()
        stack: ManagedStack = make_stack(_plantml_stack_pool.backend, artifact_mode, **{**base, **options})  # type: ignore[assignment]
        made.append(stack)
        return stack

    yield make
    if made:
        end_open_runs()
    for stack in made:
        stack.stop()


@pytest.fixture(scope="module")
def private_mlflow_stack(mlflow_stack_factory: Callable[..., ManagedStack]) -> Iterator[Stack]:
    """A stack of the session's backend for one test module alone: for tests that stop,
    restart or otherwise break its services on purpose. Started for the module, stopped after it.
    Always durable (``--stack-fast`` leaves it alone): fault tests need the real thing."""
    with mlflow_stack_factory("direct") as stack:
        try:
            yield stack
        finally:
            end_open_runs()  # while it still answers


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
    """Point MLflow's and boto3's environment variables at ``mlflow_stack`` for one test.

    MLflow and boto3 cache S3 clients and keys for the whole process: those made for another
    stack (a factory's, on a port used again) are dropped, or plain MLflow would send their keys.
    """
    from plantml.tracking.environ import forget_stale_s3_clients

    for name, value in mlflow_stack.client_env().items():
        monkeypatch.setenv(name, value)
    forget_stale_s3_clients()
    return mlflow_stack


@pytest.fixture
def experiment_name(request: pytest.FixtureRequest) -> str:
    """A fresh experiment name for one test (created by whoever first uses it)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    return f"test_{stem}_{uuid.uuid4().hex[:8]}"
