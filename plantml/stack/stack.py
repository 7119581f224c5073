"""Start, supervise, stop and persist a stack: written once, for both runners.

:class:`ManagedStack` reads the three descriptions (:mod:`~plantml.stack.postgres`,
:mod:`~plantml.stack.s3`, :mod:`~plantml.stack.mlflow_server`) and hands them to a runner
(:mod:`~plantml.stack.host` or :mod:`~plantml.stack.containers`), which only decides how a
process runs. Its folder (:mod:`~plantml.stack.folder`) keeps the data and credentials;
a :class:`~plantml.stack.supervisor.Supervisor` brings back a service that dies.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from plantml.errors import ConfigError, StackError, StorageError, UsageError
from plantml.processes import process_start_time
from plantml.settings import bypass_proxies_for_loopback, env_number
from plantml.stack.base import Stack
from plantml.stack.endpoints import ArtifactMode, StackEndpoints
from plantml.stack.files import sync_folder
from plantml.stack.folder import CREDENTIALS, STATE, StackFolder
from plantml.stack.leftovers import prune_local_stacks
from plantml.stack.mlflow_server import MLflowServerSpec, mlflow_service
from plantml.stack.ports import check_data_dir, check_ports, free_port, port_in_use
from plantml.stack.postgres import PostgresSpec, postgres_service
from plantml.stack.s3 import S3Spec, s3_service, seaweed_security_env
from plantml.stack.service import LOOPBACK, SERVICE_NAMES, Runner, ServiceProcess, ServiceSpec
from plantml.stack.supervisor import Service, Supervisor

log = logging.getLogger(__name__)
#: Starts tried when another program takes a port chosen free before the service listens on it.
PORT_TRIES = 3

#: The secret fields of each part of a :class:`StackSpec`, kept in the folder's credentials file.
SECRET_FIELDS = {"postgres": ("user", "password", "database"), "s3": ("access_key", "secret_key"),
                 "mlflow": ("admin_username", "admin_password", "flask_secret_key")}


@dataclass(frozen=True)
class StackSpec:
    """The whole stack's description: fresh random credentials unless given (or kept in its folder)."""

    postgres: PostgresSpec = field(default_factory=PostgresSpec)
    s3: S3Spec = field(default_factory=S3Spec)
    mlflow: MLflowServerSpec = field(default_factory=MLflowServerSpec)

    def endpoints(self, *, mlflow_port: int, s3_port: int, postgres_port: int) -> StackEndpoints:
        """What users of a stack started from this description on those loopback ports see."""
        return StackEndpoints(
            tracking_uri=f"http://{LOOPBACK}:{mlflow_port}",
            s3_endpoint=f"http://{LOOPBACK}:{s3_port}",
            aws_access_key=self.s3.access_key,
            aws_secret_key=self.s3.secret_key,
            bucket=self.s3.bucket,
            buckets=self.s3.buckets,
            artifact_mode=self.mlflow.artifact_mode,
            database_uri=self.postgres.sqlalchemy_uri(LOOPBACK, postgres_port),
            username=self.mlflow.admin_username if self.mlflow.auth else None,
            password=self.mlflow.admin_password if self.mlflow.auth else None,
        )

    def credentials(self) -> dict[str, dict[str, str]]:
        """The secrets a second start on the same folder must reuse."""
        parts = asdict(self)
        return {part: {name: parts[part][name] for name in names} for part, names in SECRET_FIELDS.items()}

    def with_credentials(self, saved: Mapping[str, Mapping[str, str]]) -> StackSpec:
        """This description with the secrets of a previous start."""
        return replace(self, **{part: replace(getattr(self, part), **saved[part]) for part in SECRET_FIELDS if part in saved})

    def secrets(self) -> dict[str, str]:
        """Every secret of the stack by name, to look for where it must never be (logs, ``ps``, artifacts)."""
        found = {"database password": self.postgres.password, "s3 secret": self.s3.secret_key,
                 "admin password": self.mlflow.admin_password, "flask secret key": self.mlflow.flask_secret_key}
        jwt = {name: value for name, value in seaweed_security_env(Path("/"), self.s3.secret_key).items() if "JWT" in name}
        return {**found, **jwt}


class ManagedStack(Stack):
    """A stack whose services plantml runs itself, through one runner.

    Options: ``artifact_mode``; ``data_dir`` (keep the data and credentials there across
    starts; default a temporary folder removed at :meth:`stop`); ``durable`` (PostgreSQL
    with fsync and synchronous commit, the default; False for throwaway stacks);
    ``auth`` (MLflow's basic-auth app); ``s3_flavour`` (seaweedfs or minio); fixed
    ``mlflow_port``, ``s3_port``, ``postgres_port`` (default: the ports of the folder's
    last start when free, else free ones); ``supervise`` (restart a service that dies;
    default True); ``health_window`` (seconds a running service may fail its readiness checks
    before it is killed and restarted; default ``PLANTML_HEALTH_WINDOW``, 0: never); ``upgrade_db`` (migrate a
    kept database of an older MLflow's schema to the server's MLflow, which otherwise refuses to start on it);
    ``spec`` (a whole :class:`StackSpec` instead of the options above).
    """

    def __init__(self, runner: Runner, artifact_mode: ArtifactMode = "direct", *, spec: StackSpec | None = None,
                 data_dir: str | Path | None = None, durable: bool = True, auth: bool = False,
                 mlflow_port: int | None = None, s3_port: int | None = None, postgres_port: int | None = None,
                 s3_flavour: str | None = None, supervise: bool = True, health_window: float | None = None,
                 upgrade_db: bool = False) -> None:
        super().__init__()
        self.runner = runner
        self.spec = spec or StackSpec(postgres=PostgresSpec(durable=durable),
                                      s3=S3Spec(flavour=s3_flavour) if s3_flavour else S3Spec(),  # type: ignore[arg-type]
                                      mlflow=MLflowServerSpec(artifact_mode=artifact_mode, auth=auth))
        if upgrade_db:
            self.spec = replace(self.spec, mlflow=replace(self.spec.mlflow, upgrade_schema=True))
        self.data_dir = check_data_dir(Path(data_dir)) if data_dir is not None else None
        self.stack_id = uuid.uuid4().hex[:10]
        self.services: dict[str, Service] = {}
        self.folder: StackFolder | None = None
        #: The folder of the last start, also once stopped (a temporary one no longer exists then).
        self.folder_path: Path | None = None
        self._fixed_ports = check_ports({"mlflow": mlflow_port, "s3": s3_port, "postgres": postgres_port})
        self._supervise = supervise
        self._health_window: float = env_number("PLANTML_HEALTH_WINDOW", health_window, minimum=0)
        self._state_lock = threading.Lock()
        self._supervisor: Supervisor | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, service: str | None = None) -> ManagedStack:
        """Start every service (PostgreSQL, S3 and MLflow at once, awaited in that order), or one stopped service."""
        if service is not None:
            self._service(service).start()
            return self
        if self.services:
            raise StackError("stack", "already started")
        atexit.register(self.stop)
        bypass_proxies_for_loopback()  # its readiness checks, its clients and its services talk to 127.0.0.1
        try:
            prune_local_stacks()  # what stacks killed before their teardown left behind
            folder = self.folder = StackFolder.open(self.data_dir, self.stack_id)
            self.folder_path = folder.path
            if folder.temporary:  # made in $TMPDIR, which may be deep (removed again by stop)
                check_data_dir(folder.path, "temporary stack folder", "; set TMPDIR to a shorter folder, or give --data-dir")
            self._start_services()
        except BaseException:
            self.stop()
            raise
        self._endpoints = self.spec.endpoints(**{f"{name}_port": svc.spec.port for name, svc in self.services.items()})
        if self._supervise:
            self._supervisor = Supervisor(self.services, on_change=self._save_state, watch=folder.gone,
                                          health_window=self._health_window)
        log.info("stack ready: %r", self._endpoints)
        return self

    def stop(self, service: str | None = None) -> None:
        """Stop every service and release the folder (a temporary one is removed), or stop only ``service``.

        A stopped service stays stopped (the supervisor leaves it) until :meth:`start` names it.
        """
        if service is not None:
            self._service(service).stop()
            return
        if self._supervisor is not None:
            self._supervisor.stop()
            self._supervisor = None
        # A folder deleted under the stack: nothing left to save, and SeaweedFS would ignore SIGTERM for 15 s.
        abandoned = self.folder is not None and self.folder.gone() is not None
        for name in reversed(SERVICE_NAMES):
            if name in self.services:
                self.services[name].remove(at_once=abandoned)
        self.services = {}
        self.runner.close()
        if self.folder is not None:
            self.folder.close()
            self.folder = None
        self._endpoints = None
        atexit.unregister(self.stop)

    def write_env_file(self, path: Path) -> None:
        """Write :meth:`client_env` to ``path`` (0600, ``KEY=VALUE`` lines); removed again at :meth:`stop`,
        or by the next prune if this process is killed (see :meth:`StackFolder.write_env_file`)."""
        if self.folder is None:
            raise StackError("stack", "not started")
        self.folder.write_env_file(path, self.client_env())

    def wait(self) -> None:
        """Block while the stack runs; :class:`StackError` once a service dies and cannot be brought back."""
        if self._supervisor is None:
            raise StackError("stack", "not started, or started without supervision")
        self._supervisor.wait()

    def service_logs(self) -> dict[str, str]:
        """Each service's whole log so far."""
        return {name: svc.process.log_tail(None) for name, svc in self.services.items()}

    def log_hint(self) -> str:
        """Where the services' logs are, in a few words."""
        return self.runner.log_hint({name: svc.process for name, svc in self.services.items()})

    def secrets(self) -> dict[str, str]:
        """Every secret of this stack by name (see :meth:`StackSpec.secrets`)."""
        return self.spec.secrets()

    # -- internals -----------------------------------------------------------------------------------
    def _service(self, name: str) -> Service:
        if name not in SERVICE_NAMES:
            raise ConfigError(f"service {name!r}: expected one of {', '.join(SERVICE_NAMES)}")
        if name not in self.services:
            raise StackError(name, "the stack is not started")
        return self.services[name]

    def _start_services(self) -> None:
        assert self.folder is not None
        saved = self.folder.read_json(CREDENTIALS)
        if not saved and any((self.folder.path / name).exists() for name in SERVICE_NAMES):
            # The credentials are written before any service's folder: its data is there, its secrets are not.
            # Fresh ones would replace the file for good and wait 30 s for a database that refuses them.
            there = (self.folder.path / CREDENTIALS).exists()  # read as {}: none of the credentials in it
            what, how = (f"an empty {CREDENTIALS}", "emptied") if there else (f"no {CREDENTIALS}", "deleted")
            raise StackError("stack", f"data folder {self.folder.path} holds a stack's data but {what} "
                                      f"({how}, or lost in a crash): its database cannot be opened without it; "
                                      "restore the file, or start on a new folder")
        try:
            self.spec = self.spec.with_credentials(saved) if saved else self.spec
        except (TypeError, ValueError):  # a part that is not a mapping of the secret fields
            raise StackError("stack", f"data folder {self.folder.path}: {CREDENTIALS} cannot be read "
                                      "(not the credentials a stack wrote)") from None
        if saved:
            self._warn_of_a_lost_store()
        self.folder.write_json(CREDENTIALS, self.spec.credentials())
        self.runner.open(self.stack_id, self.folder.path)
        for attempt in range(1, PORT_TRIES + 1):
            try:
                self._start_on(self._choose_ports())
                break
            except StackError:
                lost = self._ports_taken_meanwhile()
                if not lost or attempt == PORT_TRIES:
                    raise
                log.warning("port %s, chosen free, was taken by another program before its service listened on it: "
                            "starting the stack again on other ports", ", ".join(map(str, lost)))
                for service in self.services.values():
                    service.remove(at_once=True)
                self.services = {}
        self._save_state()

    def _warn_of_a_lost_store(self) -> None:
        """Say so when a kept stack's database or object store folder is gone while the other holds data: the new,
        empty one starts, and the runs the database records lose their artifacts (or the artifacts their runs)."""
        assert self.folder is not None
        root = self.folder.path
        for name, other, lost in (("s3", "postgres", "the artifacts of the runs its database records"),
                                  ("postgres", "s3", "the runs, models and experiments its artifacts belong to")):
            if not (root / name).exists() and (root / other).is_dir():
                log.warning("data folder %s: %s/ is missing while %s/ holds data (deleted?): starting an empty %s; "
                            "%s are gone", root, name, other, name, lost)

    def _start_on(self, ports: dict[str, dict[str, int]]) -> None:
        assert self.folder is not None
        abandon = threading.Event()
        for spec in self._describe(ports):
            guarded = replace(spec, ready=abandonable(spec.name, spec.ready, abandon))
            self.folder.prepare(guarded)
            self.services[spec.name] = Service(guarded, self.runner.process(guarded, on_spawn=self._save_state))
        for service in self.services.values():
            for port in service.spec.ports.values():
                if port_in_use(port):
                    raise StackError(service.name, f"port {port} on {LOOPBACK} is already in use by another process")
        self._start_all(abandon)

    def _ports_taken_meanwhile(self) -> list[int]:
        """The ports plantml chose free (not given by the user) that a service failed to start on and another
        program holds now: it took them between their choice and the service's bind (two stacks starting at once)."""
        return sorted(port for name, service in self.services.items() if not service.running
                      for port in service.spec.ports.values()
                      if port != self._fixed_ports[name] and port_in_use(port))

    def _start_all(self, abandon: threading.Event) -> None:
        """Start the three at once: MLflow spends its first seconds importing, then retries its database."""
        def start(service: Service) -> None:
            try:
                if not service.spec.is_initialized():
                    initialize(self.runner, service.spec)
                service.start()
            except BaseException:
                abandon.set()  # the others stop waiting: their start is reported as abandoned
                raise

        with ThreadPoolExecutor(max_workers=len(self.services), thread_name_prefix="plantml-start") as pool:
            started = {name: pool.submit(start, service) for name, service in self.services.items()}
        errors = [future.exception() for future in started.values() if future.exception() is not None]
        first = next((e for e in errors if not isinstance(e, Abandoned)), errors[0] if errors else None)
        if first is not None:
            raise first

    def _choose_ports(self) -> dict[str, dict[str, int]]:
        """Each service's ports: a fixed one where given, else the last start's when all are free, else free ones."""
        assert self.folder is not None
        try:
            previous = self.folder.read_json(STATE).get("ports", {})
        except StackError:  # only a hint of the last ports (a crash cut it short): free ones do as well
            previous = {}
        roles = {"postgres": ("postgres",), "s3": self.spec.s3.port_roles, "mlflow": ("mlflow",)}
        taken = {port for port in self._fixed_ports.values() if port}
        chosen: dict[str, dict[str, int]] = {}
        for name, wanted in roles.items():
            kept = previous.get(name, {})
            fixed = self._fixed_ports[name]
            if set(kept) == set(wanted) and not any(port_in_use(p) or p in taken for p in kept.values()) \
                    and fixed in (None, kept[wanted[0]]):
                chosen[name] = dict(kept)
            else:
                chosen[name] = {role: (fixed if fixed and i == 0 else free_port(taken)) for i, role in enumerate(wanted)}
            taken |= set(chosen[name].values())
        return chosen

    def _describe(self, ports: dict[str, dict[str, int]]) -> list[ServiceSpec]:
        assert self.folder is not None
        root, network = self.folder.path, self.runner.network
        postgres = postgres_service(self.spec.postgres, root / "postgres", ports["postgres"]["postgres"], network)
        s3 = s3_service(self.spec.s3, root / "s3", ports["s3"], network)
        mlflow = mlflow_service(self.spec.mlflow, root / "mlflow", ports["mlflow"]["mlflow"], network,
                                self.spec.postgres, postgres.port, self.spec.s3, s3.port)
        return [postgres, s3, mlflow]

    def _save_state(self) -> None:
        """Record the ports and processes of this start: the next start reuses the ports, prune finds the processes."""
        with self._state_lock:  # the start threads call it at once
            if self.folder is None:
                return
            pids = {name: svc.process.pid for name, svc in self.services.items()}
            processes = {name: {"pid": pid, "started": process_start_time(pid)} for name, pid in pids.items() if pid is not None}
            try:
                self.folder.write_json(STATE, {"owner": self.stack_id, "backend": self.backend,
                                               "ports": {name: dict(svc.spec.ports) for name, svc in self.services.items()},
                                               "processes": processes})
            except (StorageError, UsageError) as exc:
                # A full (or read-only) disk must not undo the (re)start that called this: its service was stopped
                # again, five times, then the whole stack. The record is a hint for the next start's ports and for
                # prune (which also finds PostgreSQL and SeaweedFS by their command lines): written at the next change.
                log.warning("%s: the pids of this start are not recorded", exc)


def initialize(runner: Runner, spec: ServiceSpec) -> None:
    """Run ``spec.init``; a staged one (:attr:`ServiceSpec.init_staged`) into a fresh folder, renamed into place
    (and the rename synced) only once it succeeded. What an init killed half-way left aside is removed first."""
    staging = spec.staging()
    final = None if spec.init_staged is None else spec.folder / spec.init_staged
    if final is not None and final.is_dir() and any(final.iterdir()):
        # plantml's init renames a complete folder into place, so this one is damaged (or an older plantml's,
        # half-made): initialising over it could only fail, after the init's seconds; removing it may lose a database
        raise StackError(spec.name, f"{final}: holds files but no {Path(spec.initialized or '').name} (deleted?, or a "
                                    "first start of an older plantml cut short): not initialised over; restore the file, "
                                    "or remove the folder if it holds nothing you need")
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    runner.run_once(spec, spec.init)  # type: ignore[arg-type]
    if staging is None or final is None:
        return
    try:
        staging.rename(final)
        sync_folder(spec.folder)
    except OSError as exc:
        raise StackError(spec.name, f"{final}: cannot put the new {spec.init_staged} folder in place ({exc.strerror}); "
                                    f"a folder left by an interrupted first start? Remove it to initialise it again") from None


class Abandoned(StackError):
    """A service's start given up because another service of the stack failed to start."""


def abandonable(name: str, ready: Callable[[], bool], abandon: threading.Event) -> Callable[[], bool]:
    """``ready``, which gives up (raises :class:`Abandoned`) once ``abandon`` is set."""
    def check() -> bool:
        if abandon.is_set():
            raise Abandoned(name, "start abandoned: another service failed to start")
        return ready()

    return check


__all__ = ["ManagedStack", "ServiceProcess", "StackSpec"]
