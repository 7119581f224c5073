"""The cache of pulled sets: listed, and the unused ones removed, never one a training holds (real processes, real locks)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from plantml.cli import cli
from plantml.datasets import MANIFEST_NAME, build_manifest
from plantml.datasets.cache import cached_sets, hold, remove_unused
from plantml.staging import sweep
from plantml.training import synth

DAY = 86400.0


def cached(cache_root: Path, name: str, seed: int, days_unused: float) -> Path:
    """A set as a pull leaves it in the cache, last used ``days_unused`` days ago."""
    staging = cache_root / f"staging-{name}"
    synth.generate(staging, synth.SynthSpec(per_class=3, size=16, seed=seed))
    manifest = build_manifest(staging, name)
    (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    folder = cache_root / "datasets" / manifest.digest
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(folder)
    past = time.time() - days_unused * DAY
    os.utime(folder, (past, past))
    return folder


HOLD_UNTIL_STDIN_CLOSES = textwrap.dedent("""
    import sys
    from pathlib import Path
    from plantml.datasets.cache import hold

    held = hold(Path(sys.argv[1]))
    print("held" if held else "gone", flush=True)
    sys.stdin.read()
""")


def training_holding(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder`` as a training does, until its stdin is closed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_STDIN_CLOSES, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_the_cache_lists_each_set_with_its_name_size_and_last_use(tmp_path) -> None:
    old = cached(tmp_path, "old-leaves", 1, days_unused=40)
    new = cached(tmp_path, "new-leaves", 2, days_unused=1)
    (tmp_path / "datasets" / ".abc.staging-1-2-xyz").mkdir()  # a pull in progress is not a set

    listed = cached_sets(tmp_path)

    assert [(s.name, s.folder, s.files, s.in_use) for s in listed] == [("old-leaves", old, 6, False), ("new-leaves", new, 6, False)]
    assert listed[0].size_bytes == sum(p.stat().st_size for p in old.rglob("*.png"))
    assert 39.9 < (time.time() - listed[0].last_used) / DAY < 40.1


def test_sets_unused_for_the_duration_are_removed_and_the_others_kept(tmp_path) -> None:
    old = cached(tmp_path, "old-leaves", 1, days_unused=40)
    new = cached(tmp_path, "new-leaves", 2, days_unused=1)

    assert [s.folder for s in remove_unused(tmp_path, 30 * DAY, dry_run=True)] == [old] and old.is_dir()
    assert [s.folder for s in remove_unused(tmp_path, 30 * DAY)] == [old]

    assert not old.exists() and new.is_dir() and os.listdir(tmp_path / "datasets") == [new.name]


def test_a_set_a_training_holds_is_never_removed_however_old(tmp_path) -> None:
    old = cached(tmp_path, "old-leaves", 1, days_unused=40)
    os.utime(old, (time.time() - 40 * DAY,) * 2)
    training = training_holding(old)
    os.utime(old, (time.time() - 40 * DAY,) * 2)  # as if it had held it for 40 days
    try:
        assert [s.in_use for s in cached_sets(tmp_path)] == [True]
        assert remove_unused(tmp_path, 0) == [] and len(list(old.rglob("*.png"))) == 6
    finally:
        training.communicate("")
    assert [s.folder for s in remove_unused(tmp_path, 30 * DAY)] == [old] and not old.exists()


def test_taking_a_set_marks_it_used_now(tmp_path) -> None:
    old = cached(tmp_path, "old-leaves", 1, days_unused=40)
    held = hold(old)
    held.close()
    assert time.time() - old.stat().st_mtime < 60
    assert remove_unused(tmp_path, 30 * DAY) == [] and old.is_dir()


def test_a_training_that_opened_the_set_just_before_its_removal_is_told_it_is_gone(tmp_path, monkeypatch) -> None:
    """open → the removal renames it away → lock: the lock is free, but there is no set at that name any more."""
    old = cached(tmp_path, "old-leaves", 1, days_unused=40)
    flock, removed = fcntl.flock, []

    def removal_first(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_SH and not removed:
            monkeypatch.setattr(fcntl, "flock", flock)
            removed.extend(remove_unused(tmp_path, 30 * DAY))
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", removal_first)
    assert hold(old) is None
    assert [s.folder for s in removed] == [old] and not old.exists()


def test_a_removal_killed_midway_is_swept_by_the_next_pull(tmp_path) -> None:
    old = cached(tmp_path, "old-leaves", 1, days_unused=40)
    code = ("import os, sys; from pathlib import Path; from plantml.staging import set_aside; "
            "set_aside(Path(sys.argv[1])); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code, str(old)]).returncode == 9
    left = os.listdir(tmp_path / "datasets")
    assert len(left) == 1 and left[0].endswith("-removing") and cached_sets(tmp_path) == []

    assert sweep(tmp_path / "datasets") and os.listdir(tmp_path / "datasets") == []


def test_the_cache_command_lists_and_removes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path))
    old = cached(tmp_path, "old-leaves", 1, days_unused=40)
    cached(tmp_path, "new-leaves", 2, days_unused=1)
    runner = CliRunner()

    listed = runner.invoke(cli, ["data", "cache"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].startswith(f"{old.name[:12]}  old-leaves  6 files  ") and "last used 40.0 days ago" in lines[0]
    assert "new-leaves" in lines[1] and lines[2].startswith("2 set(s), ")

    would = runner.invoke(cli, ["data", "cache", "--remove-unused-for", "30d", "--dry-run"])
    assert would.exit_code == 0, would.output
    assert would.output.splitlines()[0].startswith(f"would remove {old.name[:12]}  old-leaves")
    assert would.output.splitlines()[-1].startswith("would remove 1 set(s), ") and old.is_dir()

    training = training_holding(old)
    try:
        held = runner.invoke(cli, ["data", "cache"])
        in_use = {line.split()[1]: line.endswith("  in use") for line in held.output.splitlines()[:2]}
        assert in_use == {"old-leaves": True, "new-leaves": False}, held.output
    finally:
        training.communicate("")
    os.utime(old, (time.time() - 40 * DAY,) * 2)  # taking it marked it used

    removed = runner.invoke(cli, ["data", "cache", "--remove-unused-for", "30d"])
    assert removed.exit_code == 0, removed.output
    assert removed.output.splitlines()[0].startswith(f"removed {old.name[:12]}  old-leaves")
    assert removed.output.splitlines()[-1].startswith("removed 1 set(s), ") and not old.exists()


@pytest.mark.parametrize("args, culprit", [
    (["--remove-unused-for", "soon"], "duration 'soon'"),
    (["--dry-run"], "--dry-run goes with --remove-unused-for"),
])
def test_bad_cache_options_are_one_line_and_exit_2(tmp_path, monkeypatch, args, culprit) -> None:
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "plantml", "data", "cache", *args], capture_output=True, text=True)
    assert done.returncode == 2 and culprit in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_an_empty_cache_lists_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "none"))
    listed = CliRunner().invoke(cli, ["data", "cache"])
    assert listed.exit_code == 0 and listed.output.startswith("0 set(s), 0.0 MB")
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_cache_that_is_no_folder_is_one_line_naming_the_variable_that_moves_it(tmp_path, monkeypatch) -> None:
    (tmp_path / "file").write_text("where HOME/.cache would be")
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "file"))
    done = subprocess.run([sys.executable, "-m", "plantml", "data", "cache"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == (f"plantml: error: cache folder (PLANTML_CACHE_DIR) "
                                                    f"{tmp_path / 'file' / 'datasets'}: cannot be read (Not a directory)\n")
