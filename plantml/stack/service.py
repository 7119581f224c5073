"""The service contract: one description per service, read by both runners.

A :class:`ServiceSpec` says everything about a service that does not depend on how a
process runs: its command (program name first), environment, the files written into its
folder before it starts (secrets and configuration, owner-only), the one-off command
that initialises an empty folder, the port it serves and every other port it opens,
the readiness rule and the bootstrap (create the database, the buckets).

A runner turns a spec into a :class:`ServiceProcess`: :mod:`plantml.stack.host` as a
supervised local process, :mod:`plantml.stack.containers` as a container that mounts the
service's folder at the same path and runs as the same account. Nothing else differs.
"""

from __future__ import annotations

import os
import pwd
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from plantml.errors import ConfigError, StackError
from plantml.settings import VARIABLES, env_value

LOOPBACK = "127.0.0.1"
#: The services of a stack, in start order (stopped in reverse).
SERVICE_NAMES = ("postgres", "s3", "mlflow")

Command = tuple[str, ...]
#: The suffix of the folder a service's ``init`` writes before it is renamed into place (see ``ServiceSpec.init_staged``).
INIT_SUFFIX = ".init"


@dataclass(frozen=True)
class Network:
    """How services address each other: the address they bind, the host name of each peer.

    On the host (and a container on the host network) both are 127.0.0.1; on a Docker
    bridge a container binds every interface of its own namespace and peers are
    reached by container name.
    """

    bind: str = LOOPBACK
    hosts: Mapping[str, str] = field(default_factory=dict)

    def host_of(self, service: str) -> str:
        """The host name other services use to reach ``service``."""
        return self.hosts.get(service, LOOPBACK)


@dataclass(frozen=True)
class Account:
    """The account a service process runs as (and that owns its folder)."""

    name: str
    uid: int
    gid: int
    home: str = "/"
    #: False for an account the password database does not list: a container run with ``--user UID`` (Jenkins'
    #: Docker agents, OpenShift, Kubernetes' runAsUser), whose UID has no /etc/passwd line.
    listed: bool = True

    @classmethod
    def of(cls, entry: pwd.struct_passwd) -> Account:
        """The account of a password-database entry."""
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def passwd_line(self) -> str:
        """This account as one /etc/passwd line (a container's view of the host account)."""
        return f"{self.name}:x:{self.uid}:{self.gid}:plantml service:{self.home}:/bin/sh\n"


def current_account() -> Account:
    """The account plantml runs as (named ``uidN``, not :attr:`~Account.listed`, where /etc/passwd has no line for it)."""
    uid = os.geteuid()
    try:
        return Account.of(pwd.getpwuid(uid))
    except KeyError:
        return Account(f"uid{uid}", uid, os.getegid(), listed=False)


def check_listed(service: str, account: Account) -> None:
    """One line where ``service`` (PostgreSQL's initdb and server, which look their account up) would run as an
    account the password database does not list, before anything starts."""
    if not account.listed:
        raise StackError(service, f"this account (uid {account.uid}) has no line in the password database "
                                  "(/etc/passwd), as in a container run with --user; PostgreSQL's initdb and server "
                                  "refuse to run without one: add it (or lend one with nss_wrapper, as PostgreSQL's "
                                  "image does), or use --backend containers")


def service_account(refuses_root: bool) -> Account:
    """Who runs a service: plantml's own account, or ``PLANTML_PG_USER`` where the service refuses root.

    Both runners apply this rule, so a stack's folder has the same owners on both.
    """
    if not refuses_root or os.geteuid() != 0:
        return current_account()
    chosen = env_value("PLANTML_PG_USER")
    if chosen != VARIABLES["PLANTML_PG_USER"].default:  # asked for by name: a typo must not run it as someone else
        try:
            return Account.of(pwd.getpwnam(chosen))
        except KeyError:
            raise ConfigError(f"PLANTML_PG_USER={chosen!r}: no such account on this machine") from None
    for name in (chosen, "nobody"):
        try:
            return Account.of(pwd.getpwnam(name))
        except KeyError:
            continue
    raise StackError("postgres", "running as root and no unprivileged user (postgres, nobody) exists to run the server")


@dataclass(frozen=True)
class ServiceSpec:
    """Everything about one service that both runners read. ``repr`` leaves out env and files (secrets)."""

    name: str
    #: Program name first (the runner finds it: a binary on the host, the image's PATH in a container).
    #: Never a secret in here: ``ps`` shows command lines to every local user.
    command: Command
    #: The service's own folder (data, files, working directory), owner-only, kept with the stack.
    folder: Path
    #: The port clients use, on 127.0.0.1.
    port: int
    #: Readiness: True once the service really serves (a login, a bucket round trip, /health).
    ready: Callable[[], bool] = field(repr=False)
    #: Every port the process opens, by role (the client port included): nothing else may listen.
    ports: Mapping[str, int] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Files written (0600) into the folder before every start: relative path -> content.
    files: Mapping[str, str | bytes] = field(default_factory=dict, repr=False)
    #: One-off command run while ``initialized`` (a path in the folder) is missing, e.g. initdb.
    init: Command | None = None
    initialized: str | None = None
    #: The folder (in the service's folder) that ``init`` creates, which it writes as ``<name>.init``: renamed into
    #: place only once ``init`` succeeded, so an init killed half-way leaves nothing that looks initialised.
    init_staged: str | None = None
    #: Work once the service answers: create its database or buckets (idempotent).
    bootstrap: Callable[[], None] | None = field(default=None, repr=False)
    stop_signal: signal.Signals = signal.SIGTERM
    start_timeout: float = 60
    #: The program refuses to run as root (PostgreSQL): see :func:`service_account`. It also looks its account up in
    #: the password database, so the local runner refuses an account that is not listed (:func:`check_listed`).
    refuses_root: bool = False
    #: Reads the log tail of a process that exited while starting: the program's own reason in one line, when it
    #: gave one that the description knows (a kept database of another MLflow's schema, or of another PostgreSQL).
    explain_exit: Callable[[str], str | None] | None = field(default=None, repr=False)
    #: A file (in the folder) naming the pid of the process that serves it, which the program refuses to start past
    #: while that pid is alive (PostgreSQL's ``postmaster.pid``): a process killed with the machine leaves it.
    pid_file: str | None = None

    @property
    def account(self) -> Account:
        """The account this service runs as."""
        return service_account(self.refuses_root)

    def exited_while_starting(self, cause: str, log_tail: str) -> StackError:
        """The error of its process that exited while starting: the program's own reason when
        :attr:`explain_exit` reads one in the log, else ``cause`` and the log's tail."""
        reason = self.explain_exit(log_tail) if self.explain_exit is not None else None
        return StackError(self.name, reason) if reason else StackError(self.name, cause, log_tail)

    def is_initialized(self) -> bool:
        """True when the folder needs no ``init`` (none declared, or it already ran)."""
        return self.init is None or self.initialized is None or (self.folder / self.initialized).exists()

    def staging(self) -> Path | None:
        """Where ``init`` writes what becomes :attr:`init_staged` (None when it writes in place)."""
        return None if self.init_staged is None else self.folder / f"{self.init_staged}{INIT_SUFFIX}"


class ServiceProcess(Protocol):
    """A service as one runner runs it: a local process or a container."""

    spec: ServiceSpec

    @property
    def running(self) -> bool:
        """True while the process (container) is alive."""

    @property
    def pid(self) -> int | None:
        """The host pid of its main process while it runs (for fault tests and the side-door scan)."""

    def start(self) -> None:
        """Start it (again, with the same folder and ports) and wait until ``spec.ready``; :class:`StackError` if not."""

    def stop(self) -> None:
        """Stop it, keeping its folder for :meth:`start`."""

    def kill(self) -> None:
        """Kill it at once (a hung one: stopped, paused), keeping its folder for :meth:`start`."""

    def remove(self, at_once: bool = False) -> None:
        """Stop it for good (a container is removed); the folder is the stack's business.

        ``at_once`` kills it without a graceful stop: for a stack whose folder is gone, where
        a graceful stop saves nothing and SeaweedFS ignores SIGTERM.
        """

    def trim_log(self) -> None:
        """Keep its log bounded on a stack that runs for months (the supervisor calls it as it watches)."""

    def log_tail(self, lines: int | None = 25) -> str:
        """The last ``lines`` lines of its output (all of it for None)."""


class Runner(Protocol):
    """How a stack's processes run: on the host, or in containers."""

    backend: str
    network: Network

    def open(self, stack_id: str, folder: Path) -> None:
        """Get ready to run the services of the stack ``stack_id`` kept in ``folder`` (logs, a Docker client, a reaper)."""

    def process(self, spec: ServiceSpec, on_spawn: Callable[[], None] = lambda: None) -> ServiceProcess:
        """The (not yet started) process of a service; ``on_spawn`` is called each time it is spawned, before it
        answers (the stack records its pid: a start killed half-way leaves the next start what to wait for)."""

    def run_once(self, spec: ServiceSpec, command: Command) -> None:
        """Run a one-off command of a service (its ``init``) to the end; :class:`StackError` if it fails."""

    def close(self) -> None:
        """Release what :meth:`open` took, once every process is removed."""

    def log_hint(self, processes: Mapping[str, ServiceProcess]) -> str:
        """Where a user reads the services' logs, in a few words."""
