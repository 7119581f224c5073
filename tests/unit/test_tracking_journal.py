"""Journals: written atomically, read back exactly, replayed once against a local store."""

from __future__ import annotations

import math
import time

import pytest

from plantml.cli import main
from plantml.errors import UsageError
from plantml.tracking.journal import JournalHeader, SpillFile, read_journal, write_journal
from plantml.tracking.replay import replay


def test_a_journal_round_trips_entries_and_non_finite_values(tmp_path) -> None:
    header = JournalHeader("r1", "http://127.0.0.1:5000", "3", 1.5)
    entries = [{"run": "r1", "m": ["loss", math.inf, 10, 2]}, {"run": "r1", "end": "FINISHED", "at": 20}]
    path = write_journal(tmp_path / "r1.jsonl", header, entries)
    read_header, read_entries = read_journal(path)
    assert read_header == header and read_entries == entries
    assert not list(tmp_path.glob("*.tmp"))


def test_a_file_that_is_not_a_journal_is_a_usage_error(tmp_path) -> None:
    (tmp_path / "x.jsonl").write_text("hello\n")
    with pytest.raises(UsageError, match="not a plantml journal"):
        read_journal(tmp_path / "x.jsonl")
    with pytest.raises(UsageError, match="no such file"):
        read_journal(tmp_path / "absent.jsonl")


def test_a_spill_file_gives_entries_back_in_order_then_disappears(tmp_path) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([{"i": i} for i in range(5)])
    spill.append([{"i": 5}])
    assert spill.read(4) == [{"i": i} for i in range(4)]
    assert spill.read_all() == [{"i": 4}, {"i": 5}]
    assert spill.count == 0 and not spill.path.exists()


def test_replay_sends_only_what_the_store_lacks_then_ends_the_run(tmp_path, monkeypatch) -> None:
    import mlflow
    from mlflow.entities import Metric

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment_id = client.create_experiment("replayed")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_batch(run_id, metrics=[Metric("loss", 1.0, 100, 0)], synchronous=True)  # arrived before the journal
    client.set_terminated(run_id, "FAILED")
    entries = [
        {"run": run_id, "m": ["loss", 1.0, 100, 0]},
        {"run": run_id, "m": ["loss", 0.5, 200, 1]},
        {"run": run_id, "p": ["lr", "0.1"]},
        {"run": run_id, "t": ["stage", "done"]},
        {"run": run_id, "end": "FINISHED", "at": int(time.time() * 1000)},
    ]
    journal = write_journal(tmp_path / f"{run_id}.jsonl", JournalHeader(run_id, store, experiment_id, time.time()), entries)

    result = replay(journal, timeout=10)

    assert result.status == "FINISHED" and result.already_stored == 1
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1"} and run.data.tags["stage"] == "done"
    assert run.data.tags["plantml.delivery"] == "complete"
    assert not journal.exists()


def test_replay_command_names_a_missing_journal(tmp_path, capsys) -> None:
    assert main(["tracking", "replay", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: no such file" in capsys.readouterr().err
