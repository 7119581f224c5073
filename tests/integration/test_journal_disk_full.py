"""A journal on a real, small, full file system (a tmpfs mounted for the test; CI runs as root).

When the journal cannot be written, the call raises one clear error naming the folder and
what is free; the sender goes on; ``end_run`` keeps in memory what it could not write and
still delivers it; nothing accepted is lost and no partial file is left behind.
"""

from __future__ import annotations

import subprocess

import pytest

from plantml.errors import TrackingError
from plantml.tracking import MLflowTracker


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs at ``tmp_path/disk``, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, text=True)
    assert mounted.returncode == 0, f"mounting a tmpfs needs root: {mounted.stderr}"
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.fixture
def tracker(small_disk, mlflow_env, experiment_name):
    tracker = MLflowTracker(experiment_name=experiment_name, journal_dir=small_disk)
    yield tracker
    tracker.end_run()


def fill(path) -> None:
    """Write until the file system is full."""
    with open(path, "wb", buffering=0) as out:
        try:
            while out.write(b"\0" * 4096):
                pass
        except OSError:
            pass


def test_a_full_journal_disk_is_one_clear_error_and_nothing_accepted_is_lost(tracker, small_disk, mlflow_client):
    run = tracker.start_run()
    accepted = 0
    with pytest.raises(TrackingError) as full:
        for step in range(100_000):
            tracker.log_metrics({f"m{k}": float(step) for k in range(20)}, step=step)
            accepted += 1
    message = str(full.value)
    assert message.startswith(f"journal folder {small_disk}: cannot write (No space left on device); ") and "free" in message
    assert "\n" not in message and accepted > 10
    assert tracker.flush(60)  # the sender never died: everything accepted is delivered

    tracker.end_run()  # the end cannot be written either: it is kept in memory and delivered

    stored = mlflow_client.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    history = mlflow_client.get_metric_history(run.run_id, "m7")
    assert sorted(m.step for m in history) == list(range(accepted))  # every accepted step, once
    assert sorted(p.name for p in small_disk.rglob("*") if p.is_file()) == []  # no stray partial file


def test_an_artifact_on_a_full_disk_is_refused_naming_the_folder_and_leaves_no_partial_copy(tracker, small_disk, tmp_path,
                                                                                            mlflow_client):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w" * 200_000)
    run = tracker.start_run()
    fill(small_disk / "ballast")
    with pytest.raises(TrackingError, match=f"journal folder {small_disk}.*cannot write.*free"):
        tracker.log_artifact(source)
    assert not any(p.name == "weights.bin" for p in small_disk.rglob("*"))
    (small_disk / "ballast").unlink()
    tracker.log_metric("after", 1.0)
    tracker.end_run()
    assert mlflow_client.get_run(run.run_id).data.metrics == {"after": 1.0}


def test_a_run_cannot_start_on_a_full_disk_and_ends_failed(tracker, small_disk, mlflow_client, experiment_name):
    fill(small_disk / "ballast")
    with pytest.raises(TrackingError, match=f"ended FAILED: journal folder {small_disk}: cannot write") as refused:
        tracker.start_run()
    run_id = str(refused.value).split()[1]
    assert mlflow_client.get_run(run_id).info.status == "FAILED" and tracker.run_id is None
    assert [p.name for p in small_disk.iterdir()] == ["ballast"]  # no partial journal
