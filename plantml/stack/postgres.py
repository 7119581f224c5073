"""PostgreSQL, MLflow's metadata store, described once for both runners.

Durable by default: fsync, synchronous commit and full-page writes on, so a write the
server acknowledged survives a killed backend, a killed postmaster or a crash. The
fast mode (all three off, initdb without sync) exists for throwaway stacks whose
caller asks for it; it loses acknowledged writes when a backend dies.
"""

from __future__ import annotations

import re
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plantml.errors import StackError
from plantml.stack.folder import CREDENTIALS
from plantml.stack.service import INIT_SUFFIX, Network, ServiceSpec

#: initdb reads the superuser's password from this file (owner-only, in the owner-only folder).
PASSWORD_FILE = "initdb-password"
HBA_FILE = "pg_hba.conf"
DATA = "data"


@dataclass(frozen=True)
class PostgresSpec:
    """MLflow's metadata database: one user owning one database, password authentication."""

    user: str = "mlflow"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16), repr=False)
    database: str = "mlflow"
    #: fsync and synchronous commit on (the default); False only for throwaway stacks.
    durable: bool = True

    def sqlalchemy_uri(self, host: str, port: int) -> str:
        """The backend store URI for ``mlflow server`` (given in its environment, never its command line).

        ``+psycopg2`` is explicit because SQLAlchemy 2.1 maps a bare ``postgresql://``
        to psycopg 3, which is not installed.
        """
        return f"postgresql+psycopg2://{self.user}:{self.password}@{host}:{port}/{self.database}"

    def connect(self, port: int, dbname: str | None = None, host: str = "127.0.0.1") -> Any:
        """A psycopg2 connection as the stack's user (the ``postgres`` database unless named)."""
        import psycopg2

        return psycopg2.connect(host=host, port=port, user=self.user, password=self.password,
                                dbname=dbname or "postgres", connect_timeout=3)


def server_settings(durable: bool) -> list[str]:
    """The ``-c`` settings that decide durability (spelled out either way, so a reader sees them)."""
    value = "on" if durable else "off"
    return [arg for name in ("fsync", "synchronous_commit", "full_page_writes") for arg in ("-c", f"{name}={value}")]


def hba_rules(network: Network) -> str:
    """pg_hba.conf: password (SCRAM) logins over TCP only; any address only on a private container network."""
    sources = ["127.0.0.1/32", "::1/128"] if network.bind == "127.0.0.1" else ["all"]
    return "".join(f"host all all {source} scram-sha-256\n" for source in sources)


def postgres_service(spec: PostgresSpec, folder: Path, port: int, network: Network) -> ServiceSpec:
    """PostgreSQL 15 on ``port``: a cluster in ``folder/data``, no Unix socket, SCRAM passwords."""
    data = folder / DATA
    init = ("initdb", "-D", str(data.with_name(DATA + INIT_SUFFIX)), "-U", spec.user, f"--pwfile={folder / PASSWORD_FILE}", "--auth=scram-sha-256",
            "-E", "UTF8", "--no-instructions", *(() if spec.durable else ("--no-sync",)))
    command = ("postgres", "-D", str(data), "-p", str(port), "-c", f"listen_addresses={network.bind}",
               # No Unix socket: nothing but the TCP port to guard (and no path-length limit on long folders).
               "-c", "unix_socket_directories=", "-c", f"hba_file={folder / HBA_FILE}",
               # its messages in English whatever the machine's language: the readiness check reads a refused password
               "-c", "lc_messages=C", *server_settings(spec.durable))

    def ready() -> bool:
        import psycopg2

        try:
            spec.connect(port).close()
        except psycopg2.OperationalError as exc:
            if "password authentication failed" in str(exc):  # no wait would change it
                kept = folder.parent / CREDENTIALS
                raise StackError("postgres", f"the database in {data} refuses the password kept in {kept} (edited, or "
                                             f"another stack's file): put back this stack's own {CREDENTIALS}") from None
            return False
        return True

    def create_database() -> None:
        conn = spec.connect(port)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (spec.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{spec.database}" OWNER "{spec.user}"')
        finally:
            conn.close()

    return ServiceSpec(
        name="postgres", command=command, folder=folder, port=port, ports={"postgres": port}, ready=ready,
        files={PASSWORD_FILE: spec.password + "\n", HBA_FILE: hba_rules(network)},
        # initdb writes PG_VERSION first: killed half-way (a crash, kill -9 of its group) its cluster would look
        # initialised and never start; written aside and renamed once complete, it is made again instead.
        init=init, initialized=f"{DATA}/PG_VERSION", init_staged=DATA, bootstrap=create_database,
        # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for MLflow's connections to leave.
        stop_signal=signal.SIGINT, start_timeout=30, refuses_root=True, pid_file=f"{DATA}/postmaster.pid",
        explain_exit=lambda log_tail: version_refusal(log_tail, data),
    )


#: PostgreSQL's reason for refusing a cluster another major version made (its DETAIL line).
_OTHER_VERSION = re.compile(r"initialized by PostgreSQL version (\d+(?:\.\d+)?), which is not compatible with this "
                            r"version (\d+)")


def version_refusal(log_tail: str, data: Path) -> str | None:
    """What to do about a kept cluster ``data`` that another PostgreSQL major version made (a machine or an image
    upgraded since), when the server's log ends with its refusal; None when it ends with something else."""
    found = _OTHER_VERSION.search("\n".join(log_tail.strip().splitlines()[-3:]))
    if found is None:
        return None
    made, running = found[1], found[2]
    older = tuple(map(int, made.split("."))) < (int(running),)
    upgrade = f", or move the folder to {running} with pg_upgrade after a copy" if older else ""
    return (f"the database in {data} was made by PostgreSQL {made} and this server is PostgreSQL {running}: start the "
            f"stack with PostgreSQL {made}'s server (its binaries in PLANTML_PG_BINDIR; with --backend containers, its "
            f"image in PLANTML_POSTGRES_IMAGE){upgrade}")
