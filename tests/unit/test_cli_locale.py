"""The command line in a shell whose encoding cannot show every character plantml prints (a Latin-1 locale)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from plantml.training import synth


def test_what_a_latin1_terminal_cannot_show_is_escaped_not_a_traceback(tmp_path):
    synth.generate(tmp_path / "made", synth.SynthSpec(per_class=3, size=16, seed=0))
    shutil.move(tmp_path / "made" / "healthy", tmp_path / "made" / "gesund ✓")
    latin1 = {**os.environ, "PYTHONIOENCODING": "latin-1"}  # stdout as a Latin-1 locale makes it: strict errors

    done = subprocess.run([sys.executable, "-m", "plantml", "data", "inspect", str(tmp_path / "made")],
                          env=latin1, capture_output=True, timeout=120)

    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    assert done.stdout.splitlines()[:2] == [b"diseased\t3", b"gesund \\u2713\t3"]


def test_inspect_prints_one_line_per_class_whatever_its_name(tmp_path):
    synth.generate(tmp_path / "made", synth.SynthSpec(per_class=3, size=16, seed=0))
    os.rename(tmp_path / "made" / "healthy", os.path.join(os.fsencode(tmp_path / "made"), b"pl\xe9nts"))  # named in Latin-1
    shutil.move(tmp_path / "made" / "diseased", tmp_path / "made" / "two\nlines")

    done = subprocess.run([sys.executable, "-m", "plantml", "data", "inspect", str(tmp_path / "made")],
                          capture_output=True, timeout=120)

    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.splitlines()[:3] == [b"pl%E9nts\t3", b"two\\nlines\t3", b"total\t6"]


def test_click_s_own_refusals_show_a_latin1_name_as_plantml_shows_it(capsys):
    """Was ``No such option '--pl\\udce9nts'``: click quotes what it refuses with ``repr``."""
    from plantml.cli import main

    for args, line in [
        (["pl\udce9nts"], "plantml: error: No such command 'pl%E9nts'."),
        (["train", "--pl\udce9nts"], "plantml train: error: No such option '--pl%E9nts'."),
        (["train", "--backbone", "pl\udce9nts"], "plantml train: error: Invalid value for '--backbone': 'pl%E9nts' is not"),
    ]:
        assert main(args) == 2
        assert capsys.readouterr().err.startswith(line)


def test_a_backslash_the_user_typed_before_udc_is_kept():
    from plantml.text import unescaped_bytes

    assert unescaped_bytes(repr("a\\udce9")) == repr("a\\udce9")  # typed as text: shown as typed
    assert unescaped_bytes(repr("a\\\udce9")) == "'a\\\\%E9'"  # a backslash, then a byte that is not UTF-8
