"""The journal's lines: JSON in, typed records out (the only place entries become JSON).

One file per run (:mod:`plantml.tracking.journal`), JSON lines:

- line 1, the header (:class:`JournalHeader`): which run, on which server, written by
  which process (host, pid and the process's start time, so a later process can tell
  whether the writer is gone); never a secret;
- one line per entry, with its sequence number: ``{"n": 7, "m": [key, value, ts, step]}``
  (``"p"``/``"t"`` params and tags, ``"a"`` an artifact, ``"model"``, ``"end"``);
- what the sender learnt, appended as it goes: ``{"ack": 7}`` (the server has every entry
  up to 7, the *cursor*), ``{"refused": 5, "reason": ...}`` (set aside for good), and
  ``{"progress": 6, ...}`` (how far a model's delivery got).

Non-finite metric values are written as JSON's ``NaN``/``Infinity`` tokens, which
:mod:`json` reads back; every other character outside ASCII is escaped, so a line is
ASCII and its length in bytes is its length in characters. :func:`read_lines` reports a
corrupt line by its number and goes on.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from plantml.errors import UsageError
from plantml.tracking.entries import Artifact, DatasetInput, End, Entry, MetricPoint, Model, ModelProgress, Param, Record, Tag

JOURNAL_VERSION = 2
#: Journal formats this plantml reads: 1 (plantml before the write-ahead journal, 26-29 Nov 2026: a whole file
#: written when end_run gave up waiting, entries unnumbered) is read by :func:`upgrade_v1`.
READABLE_VERSIONS = (1, 2)


def process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is no such process."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


@dataclass(frozen=True)
class JournalHeader:
    """The first line of a journal: which run, on which server, by which process."""

    run_id: str
    tracking_uri: str
    experiment_id: str
    created: float
    host: str = ""
    pid: int = 0
    pid_started: float | None = None
    journal_id: str = ""
    version: int = JOURNAL_VERSION

    @classmethod
    def for_this_process(cls, run_id: str, tracking_uri: str, experiment_id: str) -> JournalHeader:
        """A header naming the current process as the writer."""
        return cls(run_id, tracking_uri, experiment_id, time.time(), socket.gethostname(), os.getpid(),
                   process_started(os.getpid()), uuid.uuid4().hex)

    def writer_gone(self) -> bool:
        """True when the process that wrote this journal no longer runs on this machine."""
        if self.version == 1:
            return True  # written whole at end_run's timeout; no process writes it again
        if self.host != socket.gethostname():
            return False  # another machine's process: nothing here can tell
        started = process_started(self.pid)
        return started is None or self.pid_started is None or abs(started - self.pid_started) > 0.05


@lru_cache(maxsize=4096)
def _quoted(text: str) -> str:
    return json.dumps(text)


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def encode(record: Record) -> str:
    """One record as one JSON line (with its newline)."""
    entry, seq = record.entry, record.seq
    if isinstance(entry, MetricPoint):  # the hot path: written by hand, about 1 µs
        return f'{{"n":{seq},"m":[{_quoted(entry.key)},{_number(entry.value)},{entry.timestamp},{entry.step}]}}\n'
    if isinstance(entry, Param):
        body: dict[str, Any] = {"p": [entry.key, entry.value]}
    elif isinstance(entry, Tag):
        body = {"t": [entry.key, entry.value]}
    elif isinstance(entry, Artifact):
        body = {"a": {"src": entry.src, "dst": entry.dst, "dir": entry.is_dir}}
    elif isinstance(entry, Model):
        body = {"model": {"src": entry.src, "name": entry.name, "registered_model_name": entry.registered_model_name}}
    elif isinstance(entry, DatasetInput):
        body = {"d": {"name": entry.name, "digest": entry.digest, "source_type": entry.source_type, "source": entry.source,
                      "profile": entry.profile, "context": entry.context}}
    elif isinstance(entry, End):
        body = {"end": entry.status, "at": entry.at}
    else:
        raise TypeError(f"not a journal entry: {entry!r}")
    return json.dumps({"n": seq, **body}, separators=(",", ":")) + "\n"


def _decode_entry(line: dict[str, Any]) -> Entry:
    if "m" in line:
        key, value, timestamp, step = line["m"]
        return MetricPoint(str(key), float(value), int(timestamp), int(step))
    if "p" in line:
        return Param(str(line["p"][0]), str(line["p"][1]))
    if "t" in line:
        return Tag(str(line["t"][0]), str(line["t"][1]))
    if "a" in line:
        spec = line["a"]
        return Artifact(str(spec["src"]), spec.get("dst"), bool(spec.get("dir")))
    if "model" in line:
        spec = line["model"]
        return Model(str(spec["src"]), str(spec["name"]), spec.get("registered_model_name"))
    if "d" in line:
        spec = line["d"]
        return DatasetInput(str(spec["name"]), str(spec["digest"]), str(spec["source_type"]), str(spec["source"]),
                            spec.get("profile"), str(spec.get("context") or "training"))
    if "end" in line:
        return End(str(line["end"]), int(line.get("at") or time.time() * 1000))
    raise ValueError("no entry in it")


def ack_line(seq: int) -> str:
    """``{"ack": seq}``: the server has every entry up to ``seq``."""
    return f'{{"ack":{seq}}}\n'


def refused_line(seq: int, reason: str) -> str:
    """``{"refused": seq, "reason": ...}``: the server refused that entry for good."""
    return json.dumps({"refused": seq, "reason": reason[:2000]}, separators=(",", ":")) + "\n"


def progress_line(seq: int, progress: ModelProgress) -> str:
    """How far the delivery of the model at ``seq`` got."""
    return json.dumps({"progress": seq, "model_id": progress.model_id, "linked": progress.linked,
                       "uploaded": progress.uploaded, "version": progress.version,
                       "register_tried": progress.register_tried}, separators=(",", ":")) + "\n"


def header_line(header: JournalHeader) -> str:
    """The journal's first line."""
    return json.dumps({"journal": JOURNAL_VERSION, "run_id": header.run_id, "tracking_uri": header.tracking_uri,
                       "experiment_id": header.experiment_id, "created": header.created, "host": header.host,
                       "pid": header.pid, "pid_started": header.pid_started, "journal_id": header.journal_id},
                      separators=(",", ":")) + "\n"


def parse_header(raw: bytes, path: Path) -> JournalHeader:
    """The header in ``raw`` (line 1 of ``path``); a one-line :class:`UsageError` when it is not one."""
    try:
        head = json.loads(raw.decode("utf-8"))
        header = JournalHeader(str(head["run_id"]), str(head["tracking_uri"]), str(head["experiment_id"]),
                               float(head["created"]), str(head.get("host", "")), int(head.get("pid", 0)),
                               head.get("pid_started"), str(head.get("journal_id", "")), head["journal"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UsageError(f"journal {path}: not a plantml journal (line 1 is not a journal header)") from None
    if header.version not in READABLE_VERSIONS:
        raise UsageError(f"journal {path}: journal format {header.version!r} is not one this plantml reads "
                         f"({', '.join(map(str, READABLE_VERSIONS))}): recover it with the plantml that wrote it")
    return header


def upgrade_v1(data: bytes) -> bytes:
    """A version-1 journal (header, then unnumbered entries with their run id) as a current one, entries numbered
    in the order written; a model's delivery progress, which version 1 kept in its entry, becomes a progress line.
    A line that cannot be read is kept as it is, so reading the result reports it."""
    lines = data.split(b"\n")
    head = json.loads(lines[0].decode("utf-8"))
    header = JournalHeader(str(head["run_id"]), str(head["tracking_uri"]), str(head["experiment_id"]),
                           float(head["created"]), journal_id=f"v1-{uuid.uuid4().hex}")
    out, progress, seq = [header_line(header)], [], 0
    for raw in lines[1:]:
        if not raw.strip():
            continue
        seq += 1
        try:
            line = json.loads(raw.decode("utf-8"))
            if "artifact" in line:
                line["a"] = line.pop("artifact")
            record = Record(seq, _decode_entry(line))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            out.append(raw.decode("ascii", "backslashreplace") + "\n")
            continue
        out.append(encode(record))
        spec = line.get("model")
        if isinstance(spec, dict) and any(spec.get(key) for key in ("model_id", "linked", "uploaded", "register_tried")):
            progress.append(progress_line(seq, ModelProgress(spec.get("model_id"), bool(spec.get("linked")),
                                                             bool(spec.get("uploaded")), spec.get("version"),
                                                             bool(spec.get("register_tried")))))
    return "".join(out + progress).encode("ascii")


@dataclass
class LineScan:
    """What one pass over a journal's lines learnt."""

    cursor: int = 0
    refused: dict[int, str] = field(default_factory=dict)
    progress: dict[int, ModelProgress] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    last_seq: int = 0
    end: End | None = None


def read_lines(data: bytes, start: int, scan: LineScan, on_record: Callable[[Record, int], Any]) -> int:
    """Parse ``data`` from offset ``start``, handing each record and its offset to ``on_record``.

    Returns the offset after the last line read: the end, or the start of the record for
    which ``on_record`` returned False (reading stops there).
    """
    offset = start
    number = data.count(b"\n", 0, start) + 1  # line numbers count from the top of the file
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:
            scan.problems.append(f"line {number}: incomplete (the file ends in the middle of it)")
            return len(data)
        raw, line_start, offset = data[offset:end], offset, end + 1
        try:
            line = json.loads(raw.decode("utf-8"))
            if "ack" in line:
                scan.cursor = max(scan.cursor, int(line["ack"]))
            elif "refused" in line:
                scan.refused[int(line["refused"])] = str(line.get("reason", ""))
            elif "progress" in line:
                scan.progress[int(line["progress"])] = ModelProgress(
                    line.get("model_id"), bool(line.get("linked")), bool(line.get("uploaded")),
                    line.get("version"), bool(line.get("register_tried")))
            else:
                record = Record(int(line["n"]), _decode_entry(line))
                if on_record(record, line_start) is False:
                    return line_start
                scan.last_seq = max(scan.last_seq, record.seq)
                if isinstance(record.entry, End):
                    scan.end = record.entry
        except UnicodeDecodeError:
            scan.problems.append(f"line {number}: not UTF-8 text")
        except ValueError as exc:
            scan.problems.append(f"line {number}: not JSON ({str(exc).split(':')[0]})" if isinstance(exc, json.JSONDecodeError)
                                 else f"line {number}: not a journal entry ({exc})")
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            scan.problems.append(f"line {number}: not a journal entry ({type(exc).__name__})")
        number += 1
    return offset
