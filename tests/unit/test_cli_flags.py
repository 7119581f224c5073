"""Flags every command shares: an empty ``--tracking-uri`` or ``--experiment-name`` is an input error."""

from __future__ import annotations

import pytest

from plantml.cli import main


@pytest.mark.parametrize("args", [
    ["train", "--experiment-name", "", "--no-mlflow"],  # was: quietly plant_classification
    ["train", "--tracking-uri", "  "],
    ["verify", "--experiment-name", ""],
    ["registry", "list", "--tracking-uri", ""],
    ["ui", "--tracking-uri", ""],
    ["tracking", "recover", "--stale", "1h", "--experiment-name", ""],
])
def test_an_empty_tracking_flag_is_one_line_naming_it_exit_2(args, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must not be empty (leave the flag out for the default)" in err
    assert ("'--tracking-uri'" in err) == ("--tracking-uri" in args)
    assert list(tmp_path.iterdir()) == []  # no store made, nothing trained
