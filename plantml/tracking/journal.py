"""The write-ahead journal of a run: every accepted entry on local disk before the call returns.

One file per run, ``<journal_dir>/<run_id>.jsonl``: a header, one line per entry, and
what the sender learnt (the cursor, set-asides, a model's progress); the lines are
described in :mod:`plantml.tracking.journal_format`.

Writes are one ``os.write`` per call, so a process killed at any point (SIGKILL, the OOM
killer) loses nothing a call accepted: the kernel has it. ``fsync`` (which only power
loss needs) runs on flush, at epoch ends and the run's end, and at most about once a
second in between (:meth:`Journal.sync`, driven by the sender). A write the disk refuses
raises :class:`~plantml.tracking.journal_io.JournalWriteError` naming the folder and the free space, after cutting the
file back to its last whole line. The writing process holds an exclusive ``flock`` on the
file for as long as it delivers, so recovery never races a live writer, and two
recoveries never race each other. Reading a journal reports corrupt lines by number and
skips them.

Entries not yet delivered stay in memory, up to ``max_in_memory``; beyond that they are
read back from the file in order when memory has room again.

A run that stays open for days would grow its journal without end, so once the file has
grown by ``compact_at`` bytes since it was last written whole, and everything undelivered
is in memory, it is written again holding only the header, the cursor and the undelivered
entries: a new file, locked, written and fsynced before it takes the old one's name, so a
crash at any point leaves one whole journal, old or new.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from plantml.errors import TrackingError, UsageError
from plantml.staging import still_named
from plantml.tracking.entries import End, Entry, Model, ModelProgress, Record
from plantml.tracking.journal_format import (
    JournalHeader,
    LineScan,
    ack_line,
    encode,
    header_line,
    parse_header,
    progress_line,
    read_lines,
    refused_line,
    upgrade_v1,
)
from plantml.tracking.journal_io import SUFFIX, partial_path, read_all, rewrite_whole, write_all, write_error, write_whole

logger = logging.getLogger(__name__)


#: Bytes a journal grows by before it is written again without what the server has (about 900,000 metric points).
COMPACT_AT = 64 << 20
#: Most undelivered records a compaction rewrites: it holds the journal's lock, so a writer waits (~10 ms at 1,000; 1 s at 100,000).
COMPACT_MAX_PENDING = 1000
REFILL_CHUNK = 4 << 20  # bytes read at a time when records waiting on disk are read back (~80,000 points)


class JournalBusy(TrackingError):
    """Another process (or another recovery) holds the journal's lock."""


# -- the journal ---------------------------------------------------------------------------------


class Journal:
    """One run's journal, open and locked by this process: append, read back in order, acknowledge."""

    def __init__(self, path: Path, fd: int, header: JournalHeader, max_in_memory: int, scan: LineScan | None = None,
                 size: int = 0, compact_at: int = COMPACT_AT) -> None:
        self.path = path
        self.header = header
        self.max_in_memory = max_in_memory
        self.compact_at = compact_at
        self._whole_size = size  # the file's size when it was last written whole
        self._fd: int | None = fd
        self._lock = threading.RLock()
        self._size = size  # bytes of whole lines in the file
        scan = scan or LineScan()
        self.cursor = scan.cursor
        self.problems: tuple[str, ...] = tuple(scan.problems)
        self.refused: dict[int, str] = dict(scan.refused)
        #: The run's end asked for in this journal, if any.
        self.requested_end: End | None = scan.end
        self._progress = dict(scan.progress)
        self._next_seq = max(scan.last_seq, scan.cursor) + 1  # a compacted journal may hold no record at all
        self._memory: deque[Record] = deque()
        self._backlog_offset: int | None = None  # where the first record not held in memory starts
        self._unwritten: list[Record] = []  # accepted while the disk refused: memory only, after the rest
        self._dirty = False
        self._last_sync = time.monotonic()
        self._warned: set[str] = set()

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: Path, header: JournalHeader, max_in_memory: int, compact_at: int = COMPACT_AT) -> Journal:
        """A new, locked journal for ``header.run_id``; :class:`JournalWriteError` if the disk refuses."""
        path = folder / f"{header.run_id}{SUFFIX}"
        data = header_line(header).encode()
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # owner-only, as its journals: see list_journals
            fd = write_whole(path, data)
        except OSError as exc:
            raise write_error(folder, exc) from None
        return cls(path, fd, header, max_in_memory, size=len(data), compact_at=compact_at)

    @classmethod
    def open_existing(cls, path: Path, max_in_memory: int = 100_000, compact_at: int = COMPACT_AT) -> Journal:
        """Lock and read a journal left by another process (or an earlier run of this one).

        Raises :class:`JournalBusy` while another process holds it, :class:`UsageError`
        when the file is missing or is not a journal. Corrupt lines are listed in
        :attr:`problems` and skipped.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            raise UsageError(f"journal {path}: no such file") from None
        except OSError as exc:
            raise UsageError(f"journal {path}: cannot open ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not still_named(fd, path):  # its writer compacted it between our open and our lock: the name is the new file's
                raise BlockingIOError
        except BlockingIOError:
            os.close(fd)
            raise JournalBusy(f"journal {path}: in use by another process (its writer, or another recovery)") from None
        try:
            data = read_all(fd)
            first = data.find(b"\n")
            header = parse_header(data[: first if first >= 0 else len(data)], path)
            if header.version == 1:  # an older plantml's: written again as a current journal, under our lock
                fd, data = _upgraded(path, fd, data)
                first = data.find(b"\n")
                header = parse_header(data[:first], path)
            body = first + 1 if first >= 0 else len(data)
            scan = LineScan()
            read_lines(data, body, scan, lambda record, at: None)
        except BaseException:
            os.close(fd)
            raise
        journal = cls(path, fd, header, max_in_memory, scan, size=len(data), compact_at=compact_at)
        journal._backlog_offset = body
        journal._refill()
        return journal

    # -- the producer side -------------------------------------------------------------------------

    def append(self, entries: list[Entry], keep_if_refused: bool = False) -> list[Record]:
        """Write ``entries`` as records; return them once the kernel has them.

        When the disk refuses, the file is cut back to its last whole line and
        :class:`JournalWriteError` is raised (nothing of this call was accepted), unless
        ``keep_if_refused``: then the records are kept in memory only, and delivered after
        everything else.
        """
        with self._lock:
            records = [Record(self._next_seq + i, entry) for i, entry in enumerate(entries)]
            if not records or self._fd is None:
                return []
            lines = [encode(record) for record in records]
            data = "".join(lines).encode("ascii")  # json.dumps escapes every non-ASCII character
            try:
                if self._unwritten:  # earlier records are in memory only: these go after them
                    raise OSError(errno.EIO, "earlier entries could not be written either")
                write_all(self._fd, data)
            except OSError as exc:
                self._cut_back()
                error = write_error(self.path.parent, exc)
                if not keep_if_refused:
                    raise error from None
                self._warn_once("keep", "%s; entries are kept in memory only until delivered", error)
                self._unwritten.extend(records)
            else:
                self._place(records, lines)
                self._size += len(data)
                self._dirty = True
            self._next_seq += len(records)
            self.requested_end = next((r.entry for r in reversed(records) if isinstance(r.entry, End)), self.requested_end)
            return records

    def _place(self, records: list[Record], lines: list[str]) -> None:
        """Keep new records in memory up to the bound; beyond it they wait on disk, in order."""
        if self._backlog_offset is not None:
            return  # older records already wait on disk: these come after them
        room = max(0, self.max_in_memory - len(self._memory))
        self._memory.extend(records[:room])
        if room < len(records):
            self._backlog_offset = self._size + sum(len(line) for line in lines[:room])

    # -- the sender side ---------------------------------------------------------------------------

    def pending(self, limit: int) -> list[Record]:
        """Up to ``limit`` of the oldest records not acknowledged yet, in order."""
        with self._lock:
            if not self._memory:
                self._refill()
            if not self._memory and self._backlog_offset is None and self._unwritten:
                return self._unwritten[:limit]
            return [self._memory[i] for i in range(min(limit, len(self._memory)))]

    @property
    def last_seq(self) -> int:
        """The sequence number of the last record accepted (0 before any)."""
        return self._next_seq - 1

    def has_pending(self) -> bool:
        """True while some accepted record is not acknowledged."""
        with self._lock:
            return bool(self._memory or self._backlog_offset is not None or self._unwritten)

    def pending_count(self) -> int:
        """Records held in memory and not acknowledged (those waiting on disk are not counted)."""
        with self._lock:
            return len(self._memory) + len(self._unwritten)

    def model_progress(self, record: Record) -> ModelProgress:
        """The latest progress recorded for a model record."""
        return self._progress.get(record.seq, record.entry.progress if isinstance(record.entry, Model) else ModelProgress())

    def record_progress(self, record: Record, progress: ModelProgress) -> None:
        """Remember (and journal) how far a model's delivery got."""
        with self._lock:
            self._progress[record.seq] = progress
            self._note(progress_line(record.seq, progress))

    def set_aside(self, record: Record, reason: str) -> None:
        """Journal that the server refused ``record`` for good (it is acknowledged with the rest)."""
        with self._lock:
            self.refused[record.seq] = reason
            self._note(refused_line(record.seq, reason))

    def ack(self, seq: int) -> None:
        """Every record up to ``seq`` is settled (delivered or set aside): drop them, move the cursor."""
        with self._lock:
            while self._memory and self._memory[0].seq <= seq:
                self._memory.popleft()
            while self._unwritten and self._unwritten[0].seq <= seq and not self._memory and self._backlog_offset is None:
                self._unwritten.pop(0)
            self.cursor = max(self.cursor, seq)
            self._note(ack_line(seq))
            if not self._memory:
                self._refill()
            if self._size - self._whole_size >= self.compact_at:
                self._compact()

    def sync(self, at_most_every: float = 0.0) -> None:
        """fsync what was written, if anything was, and not more often than ``at_most_every`` seconds."""
        with self._lock:
            if self._fd is None or not self._dirty or time.monotonic() - self._last_sync < at_most_every:
                return
            fd, self._dirty, self._last_sync = self._fd, False, time.monotonic()
        try:
            os.fsync(fd)
        except OSError as exc:
            self._warn_once("fsync", "journal %s: fsync failed: %s", self.path, exc)

    def close(self) -> None:
        """Release the lock and the file (it stays on disk for recovery); later writes are ignored."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.close(fd)

    def remove(self) -> None:
        """Delete the journal (everything in it was settled); a folder that refuses it leaves it, with a warning.

        Nothing is lost then: a later recovery finds everything delivered and removes it.
        """
        with self._lock:
            try:
                self.path.unlink(missing_ok=True)
                partial_path(self.path).unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("journal %s: everything was delivered, but the file could not be removed (%s); "
                               "`plantml tracking replay %s` (or `plantml tracking recover` once this process has "
                               "ended) removes it", self.path, exc.strerror or exc, self.path)
            finally:
                self.close()

    def keep_aside(self) -> Path:
        """Move the journal into ``kept/`` beside it (entries refused or lines corrupt); return the new path."""
        with self._lock:
            kept = self.path.parent / "kept" / self.path.name
            try:
                kept.parent.mkdir(exist_ok=True)
                os.replace(self.path, kept)
            except OSError as exc:
                logger.warning("journal %s: could not move it to %s: %s", self.path, kept.parent, exc)
                kept = self.path
            self.close()
            self.path = kept
            return kept

    # -- inside ------------------------------------------------------------------------------------

    def _note(self, line: str) -> None:
        """Append one line of what the sender learnt; a refusing disk is only a warning here."""
        if self._fd is None:
            return
        try:
            write_all(self._fd, line.encode())
        except OSError as exc:
            self._cut_back()
            self._warn_once("note", "journal %s: %s (delivery goes on; the server has what was sent)", self.path, exc)
            return
        self._size += len(line)
        self._dirty = True

    def _compact(self) -> None:
        """Write the journal again without what the server has: header, cursor, undelivered records (best effort).

        Only while every undelivered record is in memory, and few enough, and while nothing the file alone
        knows would be lost: refused entries (kept for the user), unreadable lines, a requested end.
        """
        if (self._fd is None or self._backlog_offset is not None or self._unwritten or self.refused or self.problems
                or self.requested_end is not None or len(self._memory) > COMPACT_MAX_PENDING):
            return  # the next acknowledgement tries again
        lines = [header_line(self.header), ack_line(self.cursor)]
        lines += [progress_line(seq, progress) for seq, progress in sorted(self._progress.items()) if seq > self.cursor]
        lines += [encode(record) for record in self._memory]
        data = "".join(lines).encode("ascii")
        try:
            fd = rewrite_whole(self.path, data)
        except OSError as exc:
            self._whole_size = self._size  # try again after as much growth, not at every acknowledgement
            self._warn_once("compact", "journal %s: could not write it again without what was delivered: %s", self.path, exc)
            return
        os.close(self._fd)  # the old file, no longer named, goes with its lock
        self._fd, self._size, self._whole_size = fd, len(data), len(data)
        self._progress = {seq: progress for seq, progress in self._progress.items() if seq > self.cursor}

    def _cut_back(self) -> None:
        """Drop a partly written line, so the file keeps only whole lines."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            self._warn_once("truncate", "journal %s: could not cut back a partial line: %s", self.path, exc)

    def _refill(self) -> None:
        """Read records waiting on disk back into memory, up to the bound, skipping settled ones."""
        if self._backlog_offset is None or self._fd is None:
            return
        offset = self._backlog_offset
        scan = LineScan()

        def take(record: Record, at: int) -> bool:
            if record.seq <= self.cursor or record.seq in self.refused:
                return True
            if len(self._memory) >= self.max_in_memory:
                return False  # memory is full again: the rest waits on disk
            self._memory.append(record)
            return True

        while True:  # a chunk at a time: reading the whole rest made memory and time grow with the backlog
            data = os.pread(self._fd, REFILL_CHUNK, offset)
            at_end = len(data) < REFILL_CHUNK
            cut = len(data) if at_end else data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a chunk
                data, at_end = read_all(self._fd, offset), True
                cut = len(data)
            stopped = read_lines(data[:cut], 0, scan, take)
            if stopped < cut or at_end:
                break
            offset += cut
        self._progress.update(scan.progress)
        self._backlog_offset = offset + stopped if stopped < cut else None

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(message, *args)


def _upgraded(path: Path, fd: int, data: bytes) -> tuple[int, bytes]:
    """Write the version-1 journal ``data`` (open and locked as ``fd``) again as a current one; its locked descriptor."""
    upgraded = upgrade_v1(data)
    try:
        new_fd = rewrite_whole(path, upgraded)
    except OSError as exc:
        raise UsageError(f"journal {path}: an older plantml's journal, not written again as a current one "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    return new_fd, upgraded
