"""A stack's folder: what a stack keeps, and what finds the leftovers of a stack whose owner died.

Layout (the same for both runners; containers mount each service's folder at its own path)::

    DIR/                 0711: services running as another account may traverse it, not list it
      .lock              held (flock) by the process that runs the stack: a second start is refused
      credentials.json   0600: database, S3 and admin secrets, so a second start serves the same data
      state.json         the ports and the process ids of the last start (no secret)
      postgres/ s3/ mlflow/   0700, each owned by the account its service runs as
      logs/              0700, one log per service (local runner)

Without ``--data-dir`` the folder is temporary (in the system temp folder) and goes with
the stack. Every folder is also recorded under ``$PLANTML_CACHE_DIR/stacks``, so
:func:`plantml.stack.leftovers.prune_local_stacks` finds those whose owner was killed before its teardown.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from plantml.errors import ConfigError, StackError, os_reason
from plantml.processes import process_start_time
from plantml.settings import cache_dir
from plantml.stack.files import private_folder, write_private
from plantml.stack.service import ServiceSpec
from plantml.staging import local_writes

log = logging.getLogger(__name__)

#: Seconds a dead stack's service is given to end on its own, then to die once killed.
GRACE_S = 10.0
CREDENTIALS = "credentials.json"
STATE = "state.json"
LOCK = ".lock"
#: What a prune writes after its pid in the lock it holds while it ends a dead stack's services.
PRUNING = "prune"


#: The first line of every env file a stack writes: how a later start knows the file is plantml's to replace.
ENV_FILE_HEADER = "# written by plantml stack up for its clients; removed when that stack stops\n"


def check_env_file_target(path: Path) -> None:
    """Refuse, before a stack starts, an env file it could not write or must not replace.

    A file that exists and was not written by a stack (the user's own ``.env``) would be
    replaced, then removed at stop: its settings lost. A folder that cannot take a file
    (read-only, a parent that is a file) would fail only after every service started.
    """
    path = path.expanduser().absolute()
    if path.exists():
        try:
            first = path.open(encoding="utf-8", errors="replace").readline()
        except OSError as exc:
            raise ConfigError(f"--env-file {path}: cannot be read ({os_reason(exc)})") from None
        if first != ENV_FILE_HEADER:
            raise ConfigError(f"--env-file {path}: exists and was not written by plantml stack up; it would be "
                              "replaced, then removed at stop: give a new file name")
        owner = _running_stack_of(path)
        if owner is not None:  # replaced now and removed at this stack's stop, that stack's clients would lose it
            raise ConfigError(f"--env-file {path}: is the env file of the stack running on {owner}; "
                              "stop that stack first, or give another file name")
    existing = next(folder for folder in path.parents if folder.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        reason = os_reason(exc)
        raise ConfigError(f"--env-file {path}: cannot be written in {existing} ({reason})") from None


def _running_stack_of(env_file: Path) -> str | None:
    """The folder of a running stack (of this cache's records) that wrote ``env_file``, else None."""
    for record in sorted(registry().glob("*.json")):
        try:
            entry = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("env_file") == str(env_file) and _held(Path(str(entry.get("folder"))) / LOCK):
            return str(entry["folder"])
    return None


def _held(lock: Path) -> bool:
    """Whether a live process holds the stack lock ``lock`` (a shared try never takes it from one starting)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _refuse_foreign(path: Path) -> None:
    """Its owner could swap what the stack keeps there (``credentials.json`` with keys of its own choosing)."""
    owner = path.stat().st_uid if path.exists() else os.geteuid()
    if owner != os.geteuid():
        raise ConfigError(f"--data-dir {path}: belongs to another account (uid {owner}), which could replace "
                          "the stack's credentials and data in it: give a folder of your own")


#: The programs of a stack's local services whose command lines name its folder (MLflow's names none).
SERVICE_PROGRAMS = ("postgres", "weed")
#: In the environment of every local service: its folder in the stack's, so that prune tells the stack's own
#: services from a process a person runs on the folder (``postgres --single`` repairing a dead stack's database).
SERVICE_MARK = "PLANTML_SERVICE_FOLDER"


def registry() -> Path:
    """Where every stack records its folder while it runs (owner-only)."""
    folder = cache_dir() / "stacks"
    try:
        return private_folder(folder)
    except OSError as exc:
        raise ConfigError(f"PLANTML_CACHE_DIR: cannot keep the records of running stacks in {folder} "
                          f"({os_reason(exc)})") from None


class StackFolder:
    """One stack's folder, locked by this process while the stack runs."""

    def __init__(self, path: Path, temporary: bool, stack_id: str) -> None:
        self.path = path
        self.temporary = temporary
        self.stack_id = stack_id
        #: The client env file written for this stack and the SHA-256 of what was written (see :meth:`write_env_file`).
        self.env_file: tuple[Path, str] | None = None
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, data_dir: Path | None, stack_id: str) -> StackFolder:
        """Lock ``data_dir`` (created if missing), or a new temporary folder, and record it for prune."""
        if data_dir is None:
            with local_writes("stack data folder in the temporary folder (TMPDIR)", Path(tempfile.gettempdir())):
                path, temporary = Path(tempfile.mkdtemp(prefix="plantml-stack-")), True
        else:
            path, temporary = data_dir.expanduser().resolve(), False
            _refuse_foreign(path)
            if path.is_dir() and any(path.iterdir()) and not (path / LOCK).exists():
                raise ConfigError(f"--data-dir {path}: not empty and holds no plantml stack: give an empty or new folder")
        try:
            private_folder(path, mode=0o711)
        except OSError as exc:
            raise StackError("stack", f"data folder {path}: {exc.strerror}") from None
        _refuse_foreign(path)  # made by another account between the check above and the mkdir
        folder = cls(path, temporary, stack_id)
        folder.lock()
        try:
            folder._record()
        except BaseException:
            folder.close()  # a lock held by a failed start would refuse the next one in this process
            raise
        return folder

    def _record(self) -> None:
        """Record this folder (and its env file) where :func:`prune_local_stacks` looks."""
        entry: dict[str, Any] = {"folder": str(self.path), "temporary": self.temporary}
        if self.env_file is not None:
            entry["env_file"], entry["env_sha256"] = str(self.env_file[0]), self.env_file[1]
        folder = registry()
        with local_writes("PLANTML_CACHE_DIR: the records of running stacks in", folder):
            write_private(folder / f"{self.stack_id}.json", json.dumps(entry))

    def write_env_file(self, path: Path, env: dict[str, str]) -> None:
        """Write ``KEY=VALUE`` lines (for ``set -a; . F``, python-dotenv and plantml) to ``path``, mode 0600.

        The file goes with the stack: :meth:`close` removes it, and so does a later prune when
        the stack's process was killed, unless someone rewrote it since. A stale file would
        point plantml at a dead server.
        """
        text = ENV_FILE_HEADER + "".join(f"{key}={value}\n" for key, value in env.items())
        path = path.expanduser().absolute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_private(path, text)
        except OSError as exc:
            raise StackError("stack", f"--env-file {path}: cannot be written ({os_reason(exc)})") from None
        self.env_file = (path, hashlib.sha256(text.encode()).hexdigest())
        self._record()

    def remove_env_file(self) -> bool:
        """Remove the env file this stack wrote, unless someone rewrote it since; True when it was removed."""
        if self.env_file is None:
            return False
        (path, sha256), self.env_file = self.env_file, None
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
                return False
            path.unlink()
        except OSError:
            return False  # gone already, or not ours to read
        return True

    def lock(self, pruning: bool = False) -> None:
        """Hold the folder's lock, or refuse in one line naming the process that holds it.

        The kernel releases an flock when its holder dies, however it dies: a stale lock never blocks.
        A lock held by another process's prune (any start prunes every dead stack) is waited for, as long
        as that prune takes, unless this is a prune too: a stack started again at once on its folder
        must not be refused because an unrelated start is cleaning up after it.
        """
        with local_writes("stack data folder", self.path):
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + 2 * GRACE_S * 3 + 5  # a prune ends each of the three services in turn
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                if pruning or not _being_pruned(holder) or time.monotonic() > deadline:
                    os.close(fd)
                    raise StackError("stack", f"data folder {self.path} is in use by a running stack "
                                              f"(pid {holder.split()[0] if holder else '?'})") from None
                time.sleep(0.1)
        try:
            with local_writes("stack data folder", self.path):  # a full disk: one line, not a traceback
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}{' ' + PRUNING if pruning else ''}".encode())
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def gone(self) -> StackError | None:
        """Why this folder is no longer the one this stack locked (deleted, moved or replaced), None while it is.

        Its services would go on answering from deleted files and failing every write (500s), and their
        restarts would make an empty folder where it was: the stack must stop instead.
        """
        if self._lock_fd is None:
            return None
        held = os.fstat(self._lock_fd)
        try:
            there = os.stat(self.path / LOCK)
        except OSError:
            there = None
        if there is not None and (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
            return None
        return StackError("stack", f"data folder {self.path} was deleted or moved while the stack ran: stopping, as its "
                                   "services would write into it no more")

    def close(self) -> None:
        """Release the lock and the record; a temporary folder is removed with everything in it, and so is the env file."""
        self.remove_env_file()
        (registry() / f"{self.stack_id}.json").unlink(missing_ok=True)
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- what a second start reads back ---------------------------------------------------------
    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON file of the folder ({} when absent); one line naming it when it cannot be read or is not an object.

        A crash can leave it empty or cut short (or a person can edit it): a traceback would not say which file.
        """
        path = self.path / name
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            reason = os_reason(exc) if isinstance(exc, OSError) else f"not valid JSON: {exc}"
            raise StackError("stack", f"data folder {self.path}: {name} cannot be read ({reason})") from None
        if not isinstance(value, dict):
            raise StackError("stack", f"data folder {self.path}: {name} cannot be read (not a JSON object)")
        return value

    def write_json(self, name: str, value: dict[str, Any]) -> None:
        """Write a JSON file of the folder, owner-only; one line naming the folder when it is full or failing."""
        with local_writes("stack data folder", self.path):
            write_private(self.path / name, json.dumps(value, indent=1))

    # -- a service's folder --------------------------------------------------------------------
    def prepare(self, spec: ServiceSpec) -> None:
        """Create the service's folder for its account and write its files (0600) into it."""
        account = spec.account
        owner = None if account.uid == os.geteuid() else (account.uid, account.gid)
        with local_writes("stack data folder", self.path):
            private_folder(spec.folder, owner)
            for relative, content in spec.files.items():
                path = spec.folder / relative
                if path.parent != spec.folder:
                    private_folder(path.parent, owner)
                write_private(path, content, owner)


def _being_pruned(holder: str) -> bool:
    """Whether a lock's holder (what it wrote) is a prune, or a lock changing hands: nothing written yet, or a pid
    that is gone (the holder is writing its own over a dead one's)."""
    words = holder.split()
    if not words or words[1:] == [PRUNING]:
        return True
    return words[0].isdigit() and process_start_time(int(words[0])) is None
