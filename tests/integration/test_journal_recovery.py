"""Journals replayed and recovered against the real stack: exactly once, never over an ended run, robust to damage.

Journals are written by plantml's own journal code (:class:`plantml.tracking.journal.Journal`)
as a process that then died would have left them; ``plantml tracking replay`` and
``recover`` deliver them. Results are read back with a plain ``MlflowClient``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plantml.cli import main
from plantml.errors import TrackingError
from plantml.tracking import MLflowTracker
from plantml.tracking.entries import End, MetricPoint, Param, Tag
from plantml.tracking.journal import Journal
from plantml.tracking.journal_format import JournalHeader
from plantml.tracking.sender import HEARTBEAT_TAG, heartbeat_value


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def run_on_server(mlflow_client, experiment_name, mlflow_stack):
    experiment_id = mlflow_client.create_experiment(experiment_name)
    return mlflow_client.create_run(experiment_id).info.run_id, experiment_id


def epochs(n: int, start: int = 0) -> list:
    return [MetricPoint(key, 1.0 / (epoch + 1), 1_700_000_000_000 + epoch, epoch)
            for epoch in range(start, start + n) for key in ("train_loss", "val_loss")]


def write_journal(folder: Path, run_id: str, experiment_id: str, uri: str, entries: list) -> Path:
    live = JournalHeader.for_this_process(run_id, uri, experiment_id)
    journal = Journal.create(folder, JournalHeader(run_id, uri, experiment_id, live.created, live.host, dead_pid(), 1.0, "j"), 1000)
    journal.append(entries)
    journal.close()
    return journal.path


def steps(client, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def replay(path: Path, capsys) -> tuple[int, str, str]:
    code = main(["tracking", "replay", str(path), "--timeout", "60"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_corrupt_lines_are_named_by_number_and_the_rest_delivered(run_on_server, mlflow_env, mlflow_client, tmp_path, capsys):
    run_id, experiment_id = run_on_server
    path = write_journal(tmp_path, run_id, experiment_id, mlflow_env.tracking_uri, [*epochs(3), Param("lr", "0.1")])
    with open(path, "ab") as out:
        out.write(os.urandom(64).replace(b"\n", b" ") + b"\n")  # line 9: noise
        out.write(b'{"n":10,"m":["train_loss",0.2,1700000000009,9]}\n')  # line 10: fine
        out.write(b'{"n":11,"m":["train_loss",0.1,17000')  # line 11: the last one, cut off

    code, out, err = replay(path, capsys)

    assert code == 1 and "line 9: " in err and "line 11: incomplete" in err and "Traceback" not in out + err
    assert steps(mlflow_client, run_id) == [0, 1, 2, 9]
    assert mlflow_client.get_run(run_id).info.status == "KILLED" and path.exists()


def test_a_file_of_random_bytes_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "noise.jsonl"
    path.write_bytes(os.urandom(4096))
    code, out, err = replay(path, capsys)
    assert code == 2 and err.strip() == f"plantml: error: journal {path}: not a plantml journal (line 1 is not a journal header)"


def test_a_stale_copy_never_changes_a_run_that_has_ended(run_on_server, mlflow_env, mlflow_client, tmp_path, capsys):
    run_id, experiment_id = run_on_server
    path = write_journal(tmp_path, run_id, experiment_id, mlflow_env.tracking_uri, [*epochs(3), End("FINISHED", 1_700_000_000_100)])
    shutil.copy(path, tmp_path / "copy.jsonl")
    with open(tmp_path / "copy.jsonl", "ab") as out:  # what a copy taken before a failure would say
        out.write(b'{"n":8,"end":"FAILED","at":1700000000200}\n')
    assert replay(path, capsys)[0] == 0 and not path.exists()

    code, out, _ = replay(tmp_path / "copy.jsonl", capsys)

    assert code == 1 and "already ended FINISHED" in out and "nothing changed" in out
    assert mlflow_client.get_run(run_id).info.status == "FINISHED" and steps(mlflow_client, run_id) == [0, 1, 2]


def test_two_replays_of_one_journal_never_race(run_on_server, mlflow_env, mlflow_client, tmp_path):
    run_id, experiment_id = run_on_server
    path = write_journal(tmp_path, run_id, experiment_id, mlflow_env.tracking_uri, epochs(3000))
    env = {**os.environ, **mlflow_env.client_env()}
    replays = [subprocess.Popen([sys.executable, "-m", "plantml", "tracking", "replay", str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stdout.read() + p.stderr.read()) for p in replays)

    assert results[0][0] == 0, results
    assert results[1][0] in (1, 2) and ("in use by another process" in results[1][1] or "no such file" in results[1][1])
    assert steps(mlflow_client, run_id) == list(range(3000)) and steps(mlflow_client, run_id, "val_loss") == list(range(3000))


def test_a_deleted_run_is_one_line_and_keeps_the_journal(run_on_server, mlflow_env, mlflow_client, tmp_path, capsys):
    run_id, experiment_id = run_on_server
    path = write_journal(tmp_path, run_id, experiment_id, mlflow_env.tracking_uri, epochs(3))
    mlflow_client.delete_run(run_id)
    code, out, err = replay(path, capsys)
    assert code == 1 and out.strip() == f"run {run_id} is deleted on {mlflow_env.tracking_uri}: nothing delivered; journal kept: {path}"
    assert err == "" and path.exists()


def test_values_the_server_refuses_are_set_aside_and_the_rest_arrives(run_on_server, mlflow_env, mlflow_client, tmp_path, capsys):
    """What validation refuses today, as an older journal may hold it: the server (or the client) refuses each."""
    run_id, experiment_id = run_on_server
    bad = [Param("path", "a\x00b"), Tag("folder", os.fsdecode(b"pl\xe9nts")), MetricPoint("train_loss", 0.5, 1, 2**63)]
    path = write_journal(tmp_path, run_id, experiment_id, mlflow_env.tracking_uri,
                         [*epochs(2), *bad, Param("lr", "0.1"), *epochs(2, start=2), End("FINISHED", 1_700_000_000_100)])

    code, out, err = replay(path, capsys)

    assert code == 1 and err.count("refused by the server, set aside") == 3, out + err
    stored = mlflow_client.get_run(run_id)
    assert stored.info.status == "FINISHED" and stored.data.params == {"lr": "0.1"}
    assert stored.data.tags["plantml.rejected"] == "3" and "folder" not in stored.data.tags
    assert steps(mlflow_client, run_id) == [0, 1, 2, 3] and path.exists()


def test_recover_stale_ends_runs_whose_heartbeat_stopped(mlflow_env, mlflow_client, experiment_name, capsys):
    experiment_id = mlflow_client.create_experiment(experiment_name)
    stale = mlflow_client.create_run(experiment_id, tags={HEARTBEAT_TAG: heartbeat_value(time.time() - 3600)}).info.run_id
    alive = mlflow_client.create_run(experiment_id, tags={HEARTBEAT_TAG: heartbeat_value()}).info.run_id
    foreign = mlflow_client.create_run(experiment_id).info.run_id  # no heartbeat: not plantml's to judge

    code = main(["tracking", "recover", "--stale", "10m", "--experiment-name", experiment_name])

    out = capsys.readouterr().out
    assert code == 0 and f"ended run {stale} KILLED: heartbeat" in out
    assert mlflow_client.get_run(stale).info.status == "KILLED"
    assert "heartbeat" in mlflow_client.get_run(stale).data.tags["plantml.recovered"]
    assert [mlflow_client.get_run(r).info.status for r in (alive, foreign)] == ["RUNNING", "RUNNING"]


def test_a_run_deleted_mid_training_keeps_what_it_logged_in_the_journal(mlflow_env, mlflow_client, experiment_name, tmp_path):
    tracker = MLflowTracker(experiment_name=experiment_name, journal_dir=tmp_path / "journal")
    run = tracker.start_run()
    tracker.log_metrics({"loss": 1.0}, step=0)
    assert tracker.flush(30)
    mlflow_client.delete_run(run.run_id)
    for epoch in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / (epoch + 1)}, step=epoch)
    with pytest.raises(TrackingError, match=f"run {run.run_id} is deleted") as gone:
        tracker.end_run()
    journal = tmp_path / "journal" / f"{run.run_id}.jsonl"
    assert str(journal) in str(gone.value) and "\n" not in str(gone.value)
    reopened = Journal.open_existing(journal)
    assert [r.entry.step for r in reopened.pending(100) if isinstance(r.entry, MetricPoint)] == [1, 2, 3]
    reopened.close()


COMPACTED_THEN_KILLED = """
import os, signal, sys
from pathlib import Path
from plantml.tracking import MLflowTracker

tracker = MLflowTracker(experiment_name=sys.argv[1])
run = tracker.start_run()
journal, largest = Path(os.environ["PLANTML_JOURNAL_DIR"]) / f"{run.run_id}.jsonl", 0
for step in range(3000):
    tracker.log_metrics({"train_loss": 1.0 / (step + 1), "val_loss": 2.0 / (step + 1)}, step=step)
    if step % 500 == 499:
        assert tracker.flush(60)
        largest = max(largest, journal.stat().st_size)
for step in range(3000, 3200):  # in the journal only, when the OOM killer comes
    tracker.log_metrics({"train_loss": 1.0 / (step + 1), "val_loss": 2.0 / (step + 1)}, step=step)
print(run.run_id, largest, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_long_run_s_journal_stays_small_and_a_kill_after_it_was_rewritten_loses_nothing(mlflow_stack, mlflow_client,
                                                                                         experiment_name, tmp_path, capsys):
    journal_dir = tmp_path / "journal"
    env = {**os.environ, **mlflow_stack.client_env(), "PLANTML_JOURNAL_DIR": str(journal_dir),
           "PLANTML_JOURNAL_COMPACT_MB": "0.02"}  # rewritten every 20 KiB: about 30 times over 6,400 points
    done = subprocess.run([sys.executable, "-c", COMPACTED_THEN_KILLED, experiment_name], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    run_id, largest = done.stdout.split()
    # about 420 KB were written through it; a rewrite waits while over 1,000 entries are pending (a sender
    # behind on a loaded machine), so a flush may see up to that many more lines than the 20 KiB
    assert int(largest) < 160 * 1024

    code = main(["tracking", "recover", "--journal-dir", str(journal_dir), "--timeout", "120"])
    assert code == 0, capsys.readouterr().err
    for key in ("train_loss", "val_loss"):
        assert steps(mlflow_client, run_id, key) == list(range(3200))  # each point once, none lost
    assert mlflow_client.get_run(run_id).info.status == "KILLED"
