"""Recovery and replay against a local sqlite store: exactly once, never over an ended run, corrupt lines named."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from _stores import sqlite_run

from plantml.cli import main
from plantml.errors import UsageError
from plantml.settings import parse_duration, resolve_tracking_settings
from plantml.tracking import MLflowTracker
from plantml.tracking.entries import Artifact, End, MetricPoint, Model, Param, Tag
from plantml.tracking.journal import Journal, JournalBusy
from plantml.tracking.journal_format import JournalHeader
from plantml.tracking.recover import recover_journal, recover_orphans
from plantml.tracking.sender import resolve_delivery_settings


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A sqlite store, a run on it with one point already stored, and an empty journal folder."""
    from mlflow.entities import Metric

    client, uri, experiment_id, run_id, folder = sqlite_run(tmp_path, monkeypatch, "recovered")
    client.log_batch(run_id, metrics=[Metric("loss", 1.0, 100, 0)], synchronous=True)  # arrived before the process died
    return client, uri, experiment_id, run_id, folder


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_journal(store, entries, *, pid: int | None = None) -> Path:
    """A journal as a process that then died would have left it (its cursor before the first entry)."""
    _, uri, experiment_id, run_id, folder = store
    live = JournalHeader.for_this_process(run_id, uri, experiment_id)
    header = JournalHeader(run_id, uri, experiment_id, live.created, live.host, pid or dead_pid(), 1.0, "j1")
    journal = Journal.create(folder, header, 1000)
    journal.append(entries)
    journal.close()
    return journal.path


ENTRIES = [MetricPoint("loss", 1.0, 100, 0), MetricPoint("loss", 0.5, 200, 1), Param("lr", "0.1"), Tag("stage", "train")]


def history(client, run_id):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]


@pytest.mark.skipif(os.geteuid() != 0, reason="plays another account (nobody) planting a journal, which needs root")
def test_a_journal_another_account_planted_in_the_folder_is_not_delivered(store, tmp_path, caplog) -> None:
    """A shared PLANTML_JOURNAL_DIR (/tmp/journals): nobody's journal must not upload our files as our run's artifacts."""
    client, _, _, run_id, folder = store
    private = tmp_path / "id_rsa"
    private.write_text("PRIVATE KEY")
    planted = write_journal(store, [Param("lr", "0.1"), Artifact(str(private), None, False)])
    os.chown(planted, 65534, 65534)  # nobody's file, as if nobody had written it there

    assert main(["tracking", "recover"]) == 0

    assert client.list_artifacts(run_id) == [] and client.get_run(run_id).data.params == {}
    assert f"journal {planted}: not a file of this account (uid 65534), so not recovered" in caplog.messages
    assert planted.exists() and folder.stat().st_mode & 0o777 == 0o700  # the folder plantml made is owner-only


def test_a_dead_process_journal_is_delivered_once_and_its_run_ended_killed(store) -> None:
    client, uri, _, run_id, folder = store
    path = write_journal(store, ENTRIES)
    assert recover_orphans(folder) == [path]

    report = recover_journal(path)

    assert report.ok and report.status == "KILLED" and report.already_stored == 1
    assert history(client, run_id) == [(0, 1.0), (1, 0.5)]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.params == {"lr": "0.1"}
    assert run.data.tags["stage"] == "train" and run.data.tags["plantml.delivery"] == "complete"
    assert run.data.tags["plantml.recovered"].startswith("recovered ")
    assert not path.exists()


def test_a_long_journal_delivered_steadily_outlasts_the_timeout(store, capsys) -> None:
    """``--timeout`` is how long to keep retrying: a journal of 200,000 points took 66 s to recover on the local
    stack, 1,000,000 would take past the 300 s default; the recovery cut it off, "no answer in time", the run FAILED."""
    client, _, _, run_id, _ = store
    path = write_journal(store, [MetricPoint("loss", 1.0 / step, 100 + step, step) for step in range(1, 20_001)])

    assert main(["tracking", "recover", "--timeout", "1"]) == 0, capsys.readouterr()

    assert len(history(client, run_id)) == 20_001 and client.get_run(run_id).info.status == "KILLED"
    assert not path.exists()


def test_a_request_slower_than_the_timeout_is_progress_not_a_stall(store, monkeypatch, capsys) -> None:
    """``--timeout`` counts time without progress while tries fail: a loaded server that answers each batch in
    more than the timeout still delivers the whole journal (it was cut off after its first batch)."""
    from plantml.tracking.transport import Transport

    client, _, _, run_id, _ = store
    original = Transport.log_batch
    monkeypatch.setattr(Transport, "log_batch", lambda self, *args: time.sleep(0.8) or original(self, *args))
    path = write_journal(store, [MetricPoint("loss", 1.0 / step, 100 + step, step) for step in range(1, 2_501)])

    assert main(["tracking", "recover", "--timeout", "0.5"]) == 0, capsys.readouterr()

    assert len(history(client, run_id)) == 2_501 and client.get_run(run_id).info.status == "KILLED"
    assert not path.exists()


def test_a_server_that_keeps_failing_is_given_up_on_after_the_timeout(store, monkeypatch, capsys) -> None:
    from plantml.tracking.transport import Transport

    client, _, _, run_id, _ = store
    monkeypatch.setattr(Transport, "log_batch", lambda self, *args: (_ for _ in ()).throw(ConnectionError("refused")))
    path = write_journal(store, ENTRIES)
    started = time.monotonic()

    assert main(["tracking", "recover", "--timeout", "2"]) == 1

    assert time.monotonic() - started < 30
    out = capsys.readouterr().out
    assert "delivered 0 entries" in out and "not everything was delivered" in out and "(refused)" in out
    assert path.exists()  # kept for a later recovery
    assert history(client, run_id) == [(0, 1.0)]


def test_a_replay_reads_each_metric_s_history_once_not_once_per_batch(store, monkeypatch) -> None:
    from plantml.tracking.transport import Transport

    client, _, _, run_id, _ = store
    reads, original = [], Transport.stored_points
    monkeypatch.setattr(Transport, "stored_points", lambda self, run, key: reads.append(key) or original(self, run, key))
    path = write_journal(store, [MetricPoint("loss", float(i), 1_000 + i, i) for i in range(2_500)])

    report = recover_journal(path)

    assert report.ok and report.delivered == 2_502 and report.already_stored == 0  # with the recovered tag and the end
    assert reads == ["loss"]  # three batches: a read of the whole history before each made a replay quadratic
    assert len(client.get_metric_history(run_id, "loss")) == 2_501


def test_a_replay_that_ends_a_run_failed_for_a_refused_model_says_failed(store, tmp_path) -> None:
    client, _, _, run_id, _ = store
    path = write_journal(store, [Model(str(tmp_path / "gone" / "model"), "model"), End("FINISHED", 2_000)])  # its spool gone

    report = recover_journal(path)

    assert client.get_run(run_id).info.status == "FAILED"  # never FINISHED without its model
    assert report.status == "FAILED" and "ended FAILED" in report.message and len(report.refused) == 1


def test_the_status_a_journal_asked_for_is_kept(store) -> None:
    client, *_ = store
    path = write_journal(store, [*ENTRIES, End("FAILED", 300)])
    assert recover_journal(path).status == "FAILED"
    assert client.get_run(store[3]).info.status == "FAILED"


@pytest.mark.parametrize("command", ["recover", "replay"])
def test_status_ends_a_journal_that_asked_for_none_so_and_leaves_one_that_did(store, command, capsys) -> None:
    client, uri, experiment_id, run_id, folder = store
    asked = client.create_run(experiment_id).info.run_id
    path = write_journal(store, ENTRIES)
    kept = Journal.create(folder, replace(JournalHeader.for_this_process(asked, uri, experiment_id), pid=dead_pid()), 1000)
    kept.append([End("FINISHED", 300)])
    kept.close()

    if command == "recover":
        code = main(["tracking", "recover", "--status", "FAILED"])
    else:
        code = max(main(["tracking", "replay", "--status", "FAILED", str(journal)]) for journal in (path, kept.path))

    assert code == 0, capsys.readouterr()
    assert (client.get_run(run_id).info.status, client.get_run(asked).info.status) == ("FAILED", "FINISHED")
    assert not path.exists() and not kept.path.exists()


def test_a_stale_copy_never_changes_a_run_that_has_ended(store, tmp_path) -> None:
    client, _, _, run_id, _ = store
    path = write_journal(store, [*ENTRIES, End("FINISHED", 300)])
    stale = tmp_path / "copy.jsonl"
    shutil.copy(path, stale)
    assert recover_journal(path).ok
    with open(stale, "ab") as out:
        out.write(b'{"n":9,"end":"FAILED","at":400}\n')

    report = recover_journal(stale)

    assert not report.ok and "already ended FINISHED" in report.message and "nothing changed" in report.message
    assert client.get_run(run_id).info.status == "FINISHED" and stale.exists()


def test_a_deleted_run_is_one_line_and_the_journal_is_kept(store) -> None:
    client, _, _, run_id, _ = store
    path = write_journal(store, ENTRIES)
    client.delete_run(run_id)

    report = recover_journal(path)

    assert not report.ok and f"run {run_id} is deleted" in report.message and "\n" not in report.message
    assert path.exists()


def test_corrupt_lines_are_named_the_rest_delivered_and_the_journal_kept(store, capsys) -> None:
    client, _, _, run_id, _ = store
    path = write_journal(store, ENTRIES)
    with open(path, "ab") as out:
        out.write(b"\x00\x01garbage\n")
        out.write(b'{"n":5,"m":["loss",0.25,300,2]}\n')
        out.write(b'{"n":6,"m":["loss",0.1')

    code = main(["tracking", "replay", str(path)])

    captured = capsys.readouterr()
    assert code == 1, captured
    assert "line 6: not JSON" in captured.err and "line 8: incomplete" in captured.err
    assert history(client, run_id) == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert client.get_run(run_id).info.status == "KILLED" and path.exists()


def test_a_journal_in_use_is_not_replayed(store, capsys) -> None:
    path = write_journal(store, ENTRIES)
    holder = Journal.open_existing(path)
    try:
        with pytest.raises(JournalBusy, match="in use"):
            recover_journal(path)
        assert main(["tracking", "replay", str(path)]) == 1
        assert "in use by another process" in capsys.readouterr().err
    finally:
        holder.close()


def test_two_recoveries_at_once_leave_each_other_s_journals_alone_and_both_succeed(store, monkeypatch, capsys) -> None:
    client, _, _, run_id, folder = store
    path = write_journal(store, ENTRIES)
    taken = folder / "0123456789abcdef0123456789abcdef.jsonl"  # the other recovery removed it after this one's scan
    holder = Journal.open_existing(path)  # the other recovery holds this one
    monkeypatch.setattr("plantml.tracking.recover.recover_orphans", lambda folder: [taken, path])
    try:
        assert main(["tracking", "recover"]) == 0, capsys.readouterr()
        out = capsys.readouterr().out
        assert f"journal {taken}: recovered by another process meanwhile" in out
        assert f"journal {path}: being recovered by another process; left to it" in out
    finally:
        holder.close()
    assert path.exists() and client.get_run(run_id).info.status == "RUNNING"


def test_only_journals_of_gone_processes_are_recovered(store) -> None:
    client, uri, experiment_id, _, folder = store
    dead = write_journal(store, ENTRIES)
    other_run = client.create_run(experiment_id).info.run_id
    alive = Journal.create(folder, JournalHeader.for_this_process(other_run, uri, experiment_id), 1000)
    alive.append(ENTRIES)
    alive.close()  # unlocked, but its writer (this process) still runs
    assert recover_orphans(folder) == [dead]


def test_recover_dry_run_lists_and_changes_nothing(store, capsys) -> None:
    client, _, _, run_id, _ = store
    path = write_journal(store, ENTRIES)
    assert main(["tracking", "recover", "--dry-run"]) == 0
    assert f"would recover {path}: run {run_id}" in capsys.readouterr().out
    assert path.exists() and client.get_run(run_id).info.status == "RUNNING"


def test_a_new_tracker_recovers_what_dead_processes_left_for_its_store(store) -> None:
    import logging

    client, uri, _, run_id, _ = store
    path = write_journal(store, ENTRIES)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("plantml.tracking.recover").addHandler(handler)
    try:
        MLflowTracker(tracking_uri=uri, experiment_name="another")
    finally:
        logging.getLogger("plantml.tracking.recover").removeHandler(handler)
    assert not path.exists() and client.get_run(run_id).info.status == "KILLED"
    assert lines == [f"recovered 1 journal(s) left by processes that died: {run_id} ended KILLED"]


def test_recovery_asks_the_journal_server_with_credentials_from_the_environment(store) -> None:
    path = write_journal(store, ENTRIES)
    report = recover_journal(path, resolve_tracking_settings(store[1]), resolve_delivery_settings(timeout_s=1))
    assert report.ok


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("1.5d", 129600)])
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == seconds


def test_a_bad_duration_names_it() -> None:
    with pytest.raises(UsageError, match="duration 'soon'"):
        parse_duration("soon")


def test_recovery_at_start_keeps_to_its_time_budget_when_the_server_is_gone(store) -> None:
    import socket
    import time

    from plantml.tracking.recover import recover_at_start

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    _, _, experiment_id, run_id, folder = store
    path = write_journal((store[0], dead, experiment_id, run_id, folder), ENTRIES)
    started = time.monotonic()
    reports = recover_at_start(resolve_delivery_settings(), resolve_tracking_settings(dead), budget=1.0)
    assert time.monotonic() - started < 5
    assert [r.ok for r in reports] == [False] and "not reachable" in reports[0].message and path.exists()


def test_recover_waits_once_for_a_server_that_is_gone_not_once_per_journal(store, capsys) -> None:
    import socket
    import time
    import uuid

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # a temporary stack stopped since: nothing listens
    client, _, experiment_id, _, folder = store
    paths = [write_journal((client, dead, experiment_id, uuid.uuid4().hex, folder), ENTRIES) for _ in range(3)]
    started = time.monotonic()
    assert main(["tracking", "recover", "--timeout", "2"]) == 1
    took = time.monotonic() - started
    out = capsys.readouterr().out.splitlines()
    assert took < 4.5, f"{took:.1f} s: each journal waited for the server"  # was 3 x 2 s
    assert len(out) == 3 and sum("not reachable (above)" in line for line in out) == 2
    # the first names its journal and run, and why in the system's words, not urllib3's three nested wrappers
    first = next(line for line in out if "(above)" not in line)
    assert re.fullmatch(rf"journal \S+\.jsonl \(run [0-9a-f]{{32}}\): {dead} not reachable \(Connection refused\); "
                        "journal kept", first), first
    assert all(path.exists() for path in paths)


@pytest.mark.parametrize("command", ["replay", "recover"])
@pytest.mark.parametrize("timeout", ["-1", "nan", "inf"])
def test_a_timeout_that_is_no_duration_is_a_usage_error(capsys, tmp_path, command, timeout):
    args = ["tracking", command, "--timeout", timeout] + ([str(tmp_path / "j.jsonl")] if command == "replay" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--timeout" in err[0]


def test_every_experiment_is_listed_past_the_first_page(tmp_path) -> None:
    """``recover --stale`` and ``plantml ui`` read every experiment; MLflow's ``search_experiments()`` gives 1,000."""
    import mlflow

    from plantml.tracking.stores import all_experiments

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    made = {client.create_experiment(f"sweep_{i}") for i in range(5)}
    listed = [e.experiment_id for e in all_experiments(client, page_size=2)]
    assert len(listed) == len(set(listed)) and made <= set(listed)  # the Default experiment too


def test_a_stale_duration_shorter_than_a_heartbeat_could_be_old_is_refused_in_one_line(store, capsys) -> None:
    code = main(["tracking", "recover", "--stale", "5s"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--stale '5s': shorter than 3m" in err


def test_recover_stale_leaves_a_run_whose_journal_a_live_process_writes(store, capsys) -> None:
    from plantml.tracking.sender import HEARTBEAT_TAG, heartbeat_value

    client, uri, _, _, journal_dir = store
    tracker = MLflowTracker(tracking_uri=uri, experiment_name="live")
    run_id = tracker.start_run().run_id
    client.set_tag(run_id, HEARTBEAT_TAG, heartbeat_value(time.time() - 3600))  # a sender held up by a slow server
    try:
        code = main(["tracking", "recover", "--stale", "10m", "--journal-dir", str(journal_dir), "--tracking-uri", uri])
        assert code == 0 and client.get_run(run_id).info.status == "RUNNING", capsys.readouterr().out
    finally:
        tracker.end_run()
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_journal_of_a_database_store_that_is_down_is_kept_in_seconds_not_after_mlflows_retries(store, capsys) -> None:
    """A run tracked straight into PostgreSQL (no server): MLflow's store retried the database ten times over 100 s
    for each such journal, with a warning of several lines each time."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"postgresql+psycopg2://mlflow:s3cret@127.0.0.1:{sock.getsockname()[1]}/mlflow"
    client, _, experiment_id, run_id, folder = store
    path = write_journal((client, down, experiment_id, run_id, folder), ENTRIES)
    started = time.monotonic()

    assert main(["tracking", "recover", "--timeout", "300"]) == 1

    took = time.monotonic() - started
    out, err = capsys.readouterr()
    assert took < 15, f"{took:.0f} s"
    assert path.exists()  # kept for a later recovery
    line = next(line for line in (out + err).splitlines() if run_id in line)
    assert "the database does not answer or refuses the connection" in line and "Connection refused" in line, line
    assert "s3cret" not in out + err
