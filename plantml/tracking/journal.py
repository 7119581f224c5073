"""The on-disk side of the resilient write path: entries as JSON lines, spill files and journals.

An *entry* is one thing the tracker asked to record, in the order it was asked:

- ``{"m": [key, value, timestamp, step]}``: a metric point (timestamp and step as logged);
- ``{"p": [key, value]}`` / ``{"t": [key, value]}``: a param / a tag;
- ``{"artifact": {"src": path, "dst": artifact_path, "dir": bool}}``: a spooled file or folder;
- ``{"model": {...}}``: a spooled MLflow model folder, with its delivery progress;
- ``{"end": status}``: the run's requested final status.

Each entry also carries ``"run"``, its run id. A *spill file* holds the entries that did
not fit in memory while the server was away; a *journal* (``<run_id>.jsonl``) is what is
left of a run when ``end_run`` gave up waiting: a header line (run id, tracking URI,
experiment id, never a secret) then every undelivered entry in order, the end request
last. ``plantml tracking replay JOURNAL`` delivers it. Non-finite metric values are
written as JSON's ``NaN``/``Infinity`` tokens, which :mod:`json` reads back.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plantml.errors import UsageError

#: Folder of journals and spooled artifacts, unless ``PLANTML_JOURNAL_DIR`` says otherwise.
DEFAULT_JOURNAL_DIR = Path("~/.cache/plantml/journal")
JOURNAL_VERSION = 1

Entry = dict[str, Any]


def journal_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where journals go: the argument, else ``$PLANTML_JOURNAL_DIR``, else ``~/.cache/plantml/journal``."""
    from plantml.settings import env_path

    return env_path("PLANTML_JOURNAL_DIR", explicit)


def dumps(entry: Entry) -> str:
    """One entry as one JSON line (no newline)."""
    return json.dumps(entry, separators=(",", ":"))


@dataclass(frozen=True)
class JournalHeader:
    """The first line of a journal: which run, on which server. No secret is ever written."""

    run_id: str
    tracking_uri: str
    experiment_id: str
    created: float

    def to_json(self) -> str:
        return dumps({"journal": JOURNAL_VERSION, "run_id": self.run_id, "tracking_uri": self.tracking_uri,
                      "experiment_id": self.experiment_id, "created": self.created})


def write_journal(path: Path, header: JournalHeader, entries: Iterable[Entry]) -> Path:
    """Write a whole journal atomically (temporary file, then rename); return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(header.to_json() + "\n")
        for entry in entries:
            out.write(dumps(entry) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return path


def read_journal(path: str | os.PathLike[str]) -> tuple[JournalHeader, list[Entry]]:
    """A journal's header and entries; a missing or malformed file is a :class:`UsageError`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"journal {path}: no such file") from None
    try:
        head = json.loads(lines[0])
        header = JournalHeader(head["run_id"], head["tracking_uri"], str(head["experiment_id"]), float(head["created"]))
        entries = [json.loads(line) for line in lines[1:] if line.strip()]
    except (IndexError, KeyError, ValueError) as exc:
        raise UsageError(f"journal {path}: not a plantml journal ({exc.__class__.__name__})") from None
    return header, entries


def new_journal_path(folder: Path, run_id: str) -> Path:
    """``<folder>/<run_id>.jsonl``, or a timestamped name beside an existing one."""
    path = folder / f"{run_id}.jsonl"
    return path if not path.exists() else folder / f"{run_id}-{int(time.time() * 1000)}.jsonl"


class SpillFile:
    """An append-only JSON-lines file read back from the front, for entries beyond the memory bound."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: Any = None
        self._read_offset = 0
        self.count = 0  # entries written and not yet read back

    def append(self, entries: Iterable[Entry]) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in reset()
        lines = [dumps(entry) + "\n" for entry in entries]
        self._writer.writelines(lines)
        self._writer.flush()
        self.count += len(lines)

    def read(self, limit: int) -> list[Entry]:
        """Up to ``limit`` of the oldest entries not read yet; the file goes once all are read."""
        if self.count == 0:
            return []
        entries: list[Entry] = []
        with open(self.path, encoding="utf-8") as src:
            src.seek(self._read_offset)
            while len(entries) < limit:
                line = src.readline()
                if not line:
                    break
                entries.append(json.loads(line))
            self._read_offset = src.tell()
        self.count -= len(entries)
        if self.count == 0:
            self.reset()
        return entries

    def read_all(self) -> list[Entry]:
        return self.read(self.count)

    def reset(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.path.unlink(missing_ok=True)
        self._read_offset = 0
        self.count = 0

    def __iter__(self) -> Iterator[Entry]:  # pragma: no cover - convenience
        return iter(self.read_all())
