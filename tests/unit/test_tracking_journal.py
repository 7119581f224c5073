"""The journal: records round-trip, the cursor and set-asides survive, corrupt lines are named, locks hold."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from plantml.errors import UsageError
from plantml.tracking.entries import Artifact, DatasetInput, End, MetricPoint, Model, ModelProgress, Param, Tag
from plantml.tracking.journal import Journal, JournalBusy
from plantml.tracking.journal_format import JournalHeader
from plantml.tracking.journal_io import read_header


def header(run_id: str = "run1") -> JournalHeader:
    return JournalHeader.for_this_process(run_id, "http://127.0.0.1:5000", "3")


@pytest.fixture
def journal(tmp_path):
    journal = Journal.create(tmp_path, header(), max_in_memory=1000)
    yield journal
    journal.close()


ENTRIES = [
    MetricPoint("loss", 0.5, 1000, 1),
    MetricPoint("loss", math.inf, 1001, 2),
    MetricPoint("grad", -math.inf, 1001, 2),
    Param("data_dir", "pl\\xe9nts"),
    Tag("note", "é ✓ \udce9"),  # a lone surrogate survives the journal (validation converts it before)
    Artifact("/spool/1/a.txt", "notes", False),
    Model("/spool/2/model", "model", "clf"),
    DatasetInput("leaves", "0f" * 16, '{"uri": "s3://data/leaves"}', "s3", '{"train_size": 20}'),
    End("FINISHED", 2000),
]


def test_records_round_trip_through_the_file(journal, tmp_path) -> None:
    written = journal.append(list(ENTRIES))
    assert [r.seq for r in written] == list(range(1, len(ENTRIES) + 1))
    journal.close()

    reopened = Journal.open_existing(tmp_path / "run1.jsonl")
    assert reopened.header == journal.header
    assert [r.entry for r in reopened.pending(100)] == ENTRIES
    assert reopened.problems == () and reopened.requested_end == End("FINISHED", 2000)
    reopened.close()


def test_the_cursor_set_asides_and_model_progress_are_remembered(journal, tmp_path) -> None:
    records = journal.append([MetricPoint("a", 1.0, 1, i) for i in range(5)] + [Model("/m", "model")])
    journal.set_aside(records[2], "HTTP 400 INVALID_PARAMETER_VALUE")
    journal.ack(3)
    journal.record_progress(records[5], ModelProgress(model_id="m-1", linked=True))
    journal.close()

    reopened = Journal.open_existing(tmp_path / "run1.jsonl")
    pending = reopened.pending(100)
    assert [r.seq for r in pending] == [4, 5, 6]
    assert reopened.cursor == 3 and reopened.refused == {3: "HTTP 400 INVALID_PARAMETER_VALUE"}
    assert reopened.model_progress(pending[-1]) == ModelProgress(model_id="m-1", linked=True)
    assert reopened.append([Tag("k", "v")])[0].seq == 7  # numbering goes on
    reopened.close()


def test_corrupt_lines_are_named_by_number_and_skipped(journal, tmp_path) -> None:
    journal.append([MetricPoint("a", 1.0, 1, 0), MetricPoint("a", 2.0, 2, 1)])
    journal.close()
    path = tmp_path / "run1.jsonl"
    with open(path, "ab") as out:
        out.write(b"\xff\xfe not text\n")  # line 4
        out.write(b'{"n": 9, "zz": 1}\n')  # line 5: JSON, but no entry
        out.write(json.dumps({"n": 10, "p": ["lr", "0.1"]}).encode() + b"\n")  # line 6: fine
        out.write(b'{"n": 11, "m": ["b", 1.0')  # line 7: cut off mid-line

    reopened = Journal.open_existing(path)
    assert [r.entry for r in reopened.pending(100)] == [MetricPoint("a", 1.0, 1, 0), MetricPoint("a", 2.0, 2, 1), Param("lr", "0.1")]
    problems = " | ".join(reopened.problems)
    assert "line 4: not UTF-8" in problems and "line 5: not a journal entry" in problems
    assert "line 7: incomplete" in problems and len(reopened.problems) == 3
    reopened.close()


def test_a_file_of_random_bytes_is_not_a_journal(tmp_path) -> None:
    path = tmp_path / "noise.jsonl"
    path.write_bytes(os.urandom(2000))
    with pytest.raises(UsageError, match="noise.jsonl: not a plantml journal"):
        Journal.open_existing(path)
    with pytest.raises(UsageError, match="no such file"):
        Journal.open_existing(tmp_path / "absent.jsonl")


def test_a_journal_is_locked_while_open(journal, tmp_path) -> None:
    with pytest.raises(JournalBusy, match="in use"):
        Journal.open_existing(tmp_path / "run1.jsonl")
    journal.close()
    Journal.open_existing(tmp_path / "run1.jsonl").close()


def test_the_writer_is_gone_only_when_its_process_is(tmp_path) -> None:
    assert not header().writer_gone()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = JournalHeader("r", "u", "1", 0.0, header().host, child.pid, 123.0, "id")
    assert dead.writer_gone()
    reused = JournalHeader("r", "u", "1", 0.0, header().host, os.getpid(), 1.0, "id")  # same pid, other start time
    assert reused.writer_gone()


def test_beyond_the_memory_bound_records_wait_on_disk_in_order(tmp_path) -> None:
    journal = Journal.create(tmp_path, header(), max_in_memory=10)
    for step in range(35):
        journal.append([MetricPoint("loss", float(step), 10, step)])
    seen = []
    while journal.has_pending():
        batch = journal.pending(4)
        assert journal.pending_count() <= 10
        seen += [r.entry.step for r in batch]
        journal.ack(batch[-1].seq)
    assert seen == list(range(35))
    journal.close()


def test_records_read_back_from_disk_are_read_a_chunk_at_a_time_not_the_whole_backlog(tmp_path, monkeypatch) -> None:
    import plantml.tracking.journal as journal_module

    journal = Journal.create(tmp_path, header(), max_in_memory=10)
    journal.append([MetricPoint("loss", float(step), 10, step) for step in range(20_000)])  # about 1 MB on disk
    monkeypatch.setattr(journal_module, "REFILL_CHUNK", 4096, raising=False)
    read, pread = [], os.pread

    def counted(fd: int, size: int, at: int) -> bytes:
        data = pread(fd, size, at)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", counted)
    seen = []
    while len(seen) < 20_000:
        read.clear()
        batch = journal.pending(10)
        seen += [r.entry.step for r in batch]
        journal.ack(batch[-1].seq)
        assert sum(read) <= 64 * 1024  # a few chunks, not the whole rest at each refill (memory as big as the backlog)
    assert seen == list(range(20_000)) and not journal.has_pending()
    journal.close()


def test_only_whole_journals_are_listed_and_read(tmp_path, journal) -> None:
    assert read_header(tmp_path / "run1.jsonl").run_id == "run1"
    assert not list(tmp_path.glob(".*.new"))  # created under another name, renamed once its header is on disk


FILL_A_SMALL_FILE = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from plantml.errors import TrackingError
    from plantml.tracking.entries import End, MetricPoint
    from plantml.tracking.journal import Journal
    from plantml.tracking.journal_format import JournalHeader

    folder = Path(sys.argv[1])
    journal = Journal.create(folder, JournalHeader.for_this_process("full", "http://127.0.0.1:1", "1"), 1000)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    accepted = 0
    try:
        for step in range(1000):
            journal.append([MetricPoint("loss", 0.5, 1000, step), MetricPoint("acc", 0.25, 1000, step)])
            accepted += 2
    except TrackingError as exc:
        print("ERROR", exc)
    kept = journal.append([End("FINISHED", 5)], keep_if_refused=True)
    print("ACCEPTED", accepted, "KEPT", len(kept), "PENDING", journal.pending_count())
""")


def test_a_refused_write_raises_naming_the_folder_and_leaves_only_whole_lines(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-c", FILL_A_SMALL_FILE, str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    error, counts = result.stdout.strip().splitlines()
    assert error.startswith(f"ERROR journal folder {tmp_path}: cannot write (File too large)") and "free" in error
    accepted = int(counts.split()[1])
    assert counts.endswith(f"KEPT 1 PENDING {accepted + 1}")  # the end is kept in memory, nothing accepted is lost
    reopened = Journal.open_existing(tmp_path / "full.jsonl")
    assert reopened.problems == ()  # the partial line was cut back
    assert len(reopened.pending(10_000)) == accepted
    reopened.close()


def test_the_spool_of_a_run_is_as_private_as_its_journal(tmp_path):
    """Another local user reads no artifact waiting for the server (a log_dict file is 0644 by the umask)."""
    from plantml.tracking.spool import Spool

    spool = Spool.of_run(tmp_path, "run1")
    copy = spool.write("config.json", lambda path: path.write_text('{"token": "abc"}'))
    assert copy.read_text() == '{"token": "abc"}'
    assert spool.folder.stat().st_mode & 0o777 == 0o700
