"""Journals written by other plantml versions: an older format read right, an unknown one refused in one line."""

from __future__ import annotations

import json

import pytest
from _stores import sqlite_run

from plantml.cli import main


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A sqlite store with a run the old process left RUNNING, and its journal folder."""
    return sqlite_run(tmp_path, monkeypatch, "upgraded")


def old_journal(store, version: int, artifact) -> bytes:
    """The lines plantml wrote when end_run gave up waiting, before the write-ahead journal (journal format 1)."""
    _, uri, experiment_id, run_id, _ = store
    lines = [{"journal": version, "run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id, "created": 1.0e9},
             {"run": run_id, "m": ["loss", 1.0, 100, 0]}, {"run": run_id, "m": ["loss", 0.5, 200, 1]},
             {"run": run_id, "p": ["lr", "0.1"]}, {"run": run_id, "t": ["stage", "train"]},
             {"run": run_id, "artifact": {"src": str(artifact), "dst": "reports", "dir": False}},
             {"run": run_id, "end": "FINISHED", "at": 300}]
    return "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()


def test_a_journal_an_older_plantml_left_is_recovered_whole_and_once(store, tmp_path, capsys) -> None:
    client, _, _, run_id, folder = store
    report = tmp_path / "report.txt"
    report.write_text("confusion matrix")
    (folder / f"{run_id}.jsonl").write_bytes(old_journal(store, 1, report))

    assert main(["tracking", "recover", "--dry-run"]) == 0
    assert f"run {run_id} on {store[1]} (left by an older plantml)" in capsys.readouterr().out
    assert main(["tracking", "recover"]) == 0
    assert main(["tracking", "recover"]) == 0  # nothing left to send twice

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # the status the journal asked for, not KILLED
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5)]
    assert run.data.params == {"lr": "0.1"} and run.data.tags["stage"] == "train"
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/report.txt"]
    assert list(folder.glob("*.jsonl")) == [] and not (folder / "kept").exists()


def test_a_journal_of_a_format_this_plantml_does_not_know_is_refused_in_one_line(store, tmp_path, capsys) -> None:
    """A user who went back to this version after a newer one: its journal is left whole for the newer plantml."""
    client, _, _, run_id, folder = store
    journal = folder / f"{run_id}.jsonl"
    journal.write_bytes(written := old_journal(store, 3, tmp_path / "report.txt"))

    assert main(["tracking", "replay", str(journal)]) == 2

    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "journal format 3 is not one this plantml reads" in err and str(journal) in err
    assert journal.read_bytes() == written
    assert client.get_run(run_id).info.status == "RUNNING" and client.get_run(run_id).data.params == {}
