"""A plantml command run from a folder deleted under the shell: one line, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# chdir into a folder, remove it, then run the command there (a shell whose folder another one deleted).
IN_A_DELETED_FOLDER = """
import os, sys
os.chdir(sys.argv[1]); os.rmdir(sys.argv[1])
from plantml.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_command_in_a_deleted_folder_says_so_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", IN_A_DELETED_FOLDER, str(folder), "registry", "list"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "plantml: error: the current folder no longer exists (deleted while this shell was in it); cd to another"]
