"""A journal that stays open is written again without what the server has: bounded, and whole at every instant."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from plantml.tracking.entries import MetricPoint, Model, ModelProgress
from plantml.tracking.journal import Journal, JournalBusy
from plantml.tracking.journal_format import JournalHeader
from plantml.tracking.journal_io import list_journals

COMPACT_AT = 4096


def header(run_id: str = "run1") -> JournalHeader:
    return JournalHeader.for_this_process(run_id, "http://127.0.0.1:5000", "3")


def points(start: int, count: int) -> list[MetricPoint]:
    return [MetricPoint("loss", 1.0 / (step + 1), 1_700_000_000_000 + step, step) for step in range(start, start + count)]


def test_an_open_run_s_journal_stays_bounded_and_keeps_what_the_server_lacks(tmp_path) -> None:
    journal = Journal.create(tmp_path, header(), max_in_memory=1000, compact_at=COMPACT_AT)
    progress = ModelProgress(model_id="m-7", linked=True)
    for batch in range(300):  # about 90 KB of records in all
        journal.append(points(batch * 5, 5))
        journal.ack(journal.last_seq - 3)  # the server always lacks the last three
        assert journal.path.stat().st_size < COMPACT_AT + 1024
    model = journal.append([Model("/spool/9/model", "model", "clf")])[0]
    journal.record_progress(model, progress)
    journal.append(points(1500, 100))  # about 6 KB more: the next acknowledgement writes it again
    journal.ack(journal.cursor)
    lines = journal.path.read_bytes().splitlines()
    assert len(lines) == 1 + 1 + 1 + 104  # header, cursor, the model's progress, the records the server lacks
    expected = [(r.seq, r.entry) for r in journal.pending(1000)]
    journal.close()

    reopened = Journal.open_existing(tmp_path / "run1.jsonl")
    assert [(r.seq, r.entry) for r in reopened.pending(1000)] == expected  # three points, the model, a hundred points
    assert len(expected) == 104 and reopened.problems == () and reopened.model_progress(model) == progress
    assert reopened.append(points(9000, 1))[0].seq == expected[-1][0] + 1  # numbering goes on
    reopened.close()
    assert not list(tmp_path.glob(".*"))  # no partial file left behind


def test_a_journal_acknowledged_to_its_last_record_reopens_numbering_after_it(tmp_path) -> None:
    journal = Journal.create(tmp_path, header(), max_in_memory=1000, compact_at=COMPACT_AT)
    for batch in range(100):
        journal.append(points(batch * 5, 5))
        journal.ack(journal.last_seq)
    journal.append(points(500, 100))  # about 6 KB: written again at its acknowledgement, with no record left
    journal.ack(journal.last_seq)
    assert len(journal.path.read_bytes().splitlines()) == 2  # the header and the cursor
    last = journal.last_seq
    journal.close()

    reopened = Journal.open_existing(tmp_path / "run1.jsonl")
    assert not reopened.has_pending() and reopened.cursor == last
    later = reopened.append(points(5000, 1))  # what a recovery appends (its tag, the end) must not pass for delivered
    assert later[0].seq == last + 1 and [r.seq for r in reopened.pending(10)] == [last + 1]
    reopened.close()


def test_a_journal_with_an_entry_set_aside_is_kept_whole_for_the_user(tmp_path) -> None:
    journal = Journal.create(tmp_path, header(), max_in_memory=1000, compact_at=COMPACT_AT)
    refused = journal.append(points(0, 1))[0]
    journal.set_aside(refused, "HTTP 400 INVALID_PARAMETER_VALUE")
    for batch in range(100):
        journal.append(points(1 + batch * 5, 5))
        journal.ack(journal.last_seq)
    assert journal.path.stat().st_size > 4 * COMPACT_AT  # the refused entry stays readable in its file
    journal.close()


def test_a_partial_file_left_by_a_compaction_killed_midway_does_not_stop_the_next(tmp_path) -> None:
    (tmp_path / ".run1.jsonl.new").write_bytes(b'{"journal":2,"run_id":"run1"')
    journal = Journal.create(tmp_path / "j", header(), max_in_memory=1000, compact_at=COMPACT_AT)
    (tmp_path / "j" / ".run1.jsonl.new").write_bytes(b'{"journal":2,"run_id":"run1"')
    for batch in range(100):
        journal.append(points(batch * 5, 5))
        journal.ack(journal.last_seq)
    assert journal.path.stat().st_size < COMPACT_AT + 1024
    assert list_journals(tmp_path / "j") == [journal.path]
    journal.remove()
    assert not list((tmp_path / "j").iterdir())


def test_a_recovery_that_opened_the_old_file_just_before_a_compaction_is_refused(tmp_path, monkeypatch) -> None:
    """open → the writer gives the name to a new file → lock: the old file's lock is free, but it is no journal anymore."""
    writer = Journal.create(tmp_path, header(), max_in_memory=1000, compact_at=COMPACT_AT)
    writer.append(points(0, 10))
    flock, compacted = fcntl.flock, []

    def compact_first(fd: int, operation: int) -> None:
        if not compacted:
            compacted.append(True)
            writer.append(points(10, 200))
            writer.ack(writer.last_seq)  # well past COMPACT_AT: written again, the old file closed and unlocked
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", compact_first)
    with pytest.raises(JournalBusy, match="in use"):
        Journal.open_existing(tmp_path / "run1.jsonl")
    monkeypatch.setattr(fcntl, "flock", flock)
    assert compacted and writer.path.stat().st_size < COMPACT_AT
    writer.close()


KEEP_WRITING = textwrap.dedent("""
    import sys
    from pathlib import Path
    from plantml.tracking.entries import MetricPoint
    from plantml.tracking.journal import Journal
    from plantml.tracking.journal_format import JournalHeader

    journal = Journal.create(Path(sys.argv[1]), JournalHeader.for_this_process("run1", "http://127.0.0.1:5000", "3"),
                             max_in_memory=100_000, compact_at=2048)
    step = 0
    print("ready", flush=True)
    while True:
        journal.append([MetricPoint("loss", 0.5, 1_700_000_000_000, step + i) for i in range(7)])
        step += 7
        journal.ack(journal.last_seq - 5)
""")


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.7])
def test_a_writer_killed_at_any_instant_leaves_one_whole_journal(tmp_path, delay) -> None:
    child = subprocess.Popen([sys.executable, "-c", KEEP_WRITING, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()

    journal = Journal.open_existing(tmp_path / "run1.jsonl")
    pending = journal.pending(1000)
    assert journal.problems == ()
    assert journal.cursor > 0 and pending, "the writer wrote nothing: the test proves nothing"
    assert [r.seq for r in pending] == list(range(journal.cursor + 1, pending[-1].seq + 1))  # every record the server lacks
    assert [r.entry.step for r in pending] == [r.seq - 1 for r in pending]
    assert os.path.getsize(journal.path) < 2048 + 4096
    journal.close()
