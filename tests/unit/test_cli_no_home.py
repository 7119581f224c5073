"""An account with no home: HOME unset and no ``/etc/passwd`` line (``docker run --user UID`` of an image that does
not list that user, a bare cron or service unit). Was a pathlib traceback from plantml's cache folder, then one from
MLflow's import; now one line naming what to set, exit 2, before torch is imported, and a training that tracks
nothing runs given its cache folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plantml.training import synth

#: plantml's command line in a process whose account has no /etc/passwd line; prints the exit code, and whether
#: torch was imported.
PROBE = """
import pwd, sys
def unlisted(uid):
    raise KeyError(f"getpwuid(): uid not found: {uid}")
pwd.getpwuid = unlisted
from plantml.cli import main
code = main(sys.argv[1:])
print(code, "torch" in sys.modules)
"""
MLFLOW_NEEDS_HOME = (f"plantml: error: no home folder (HOME is unset, and uid {os.getuid()} has no /etc/passwd line), "
                     "which MLflow needs: set HOME to a folder this account can write")


def _without_home(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PLANTML_", "MLFLOW_", "AWS_")) and k != "HOME"}
    environ.update({k: v.format(tmp=tmp_path) for k, v in env.items()})
    return subprocess.run([sys.executable, "-c", PROBE, *(a.format(tmp=tmp_path) for a in args)], env=environ,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["train", "--no-mlflow"], {},
     f"plantml: error: PLANTML_CACHE_DIR ~/.cache/plantml: no home folder to put it in (HOME is unset, and uid "
     f"{os.getuid()} has no /etc/passwd line): set HOME, or PLANTML_CACHE_DIR to a folder"),
    (["train", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"], {"PLANTML_CACHE_DIR": "{tmp}/cache"}, MLFLOW_NEEDS_HOME),
    (["registry", "list", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"], {"PLANTML_CACHE_DIR": "{tmp}/cache"},
     MLFLOW_NEEDS_HOME),
], ids=["cache folder", "train", "registry"])
def test_no_home_is_one_line_naming_what_to_set(tmp_path: Path, args: list[str], env: dict[str, str], expected: str) -> None:
    done = _without_home(tmp_path, args, env)

    assert done.stderr.splitlines() == [expected], done.stderr[-3000:]
    assert done.stdout.split() == ["2", "False"]
    assert not (tmp_path / "~").exists()  # nothing made under a "~" taken literally


def test_a_training_that_tracks_nothing_runs_without_a_home_given_its_cache_folder(tmp_path: Path) -> None:
    leaves = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=6, size=16, seed=0))
    done = _without_home(tmp_path, ["train", "--no-mlflow", "--data-dir", str(leaves), "--epochs", "1", "--image-size",
                                    "32", "--weights", "none", "--num-workers", "0"], {"PLANTML_CACHE_DIR": "{tmp}/cache"})

    assert done.returncode == 0 and done.stdout.split()[-2:] == ["0", "True"], done.stderr[-3000:]
    assert "best epoch 1" in done.stdout


def test_a_folder_is_inspected_without_a_home_and_without_a_cache_folder(tmp_path: Path) -> None:
    """The scan record goes in the cache folder: with none to be had, nothing is recorded, and nothing stops."""
    leaves = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=6, size=16, seed=0))
    done = _without_home(tmp_path, ["data", "inspect", str(leaves)], {})

    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "0 True", done.stderr[-3000:]
    assert "total\t12" in done.stdout
