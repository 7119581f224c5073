"""A path given on the command line whose name is too long for the file system is one line naming it, exit 2."""

from __future__ import annotations

import pytest

from plantml.cli import main


@pytest.mark.parametrize("command", [
    ["data", "inspect", "{long}"],
    ["data", "synth", "{long}", "--per-class", "3", "--size", "16"],
    ["train", "--no-mlflow", "--epochs", "1", "--data-dir", "{long}"],
    ["stack", "up", "--env-file", "{long}"],
], ids=lambda command: " ".join(command[:2]))
def test_a_name_too_long_for_the_file_system_is_one_line_naming_it(tmp_path, capsys, command):
    long = tmp_path / ("n" * 300)  # a file name is at most 255 bytes on Linux's file systems

    code = main([part.replace("{long}", str(long)) for part in command])

    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == f"plantml: error: {long}: file name too long for the file system"
    assert not list(tmp_path.iterdir())  # nothing written, nothing started
