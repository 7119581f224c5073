"""The scan record: a training reads only the images changed since the folder's last scan, and the content hash
it gives is always the one a scan reading every byte gives, whatever happened to the files or to the record."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from plantml.cli import main
from plantml.datasets import scan_record
from plantml.errors import DataError
from plantml.training import synth
from plantml.training.data import scan_image_folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of the test's own, and no settling time (the files were all written a moment ago)."""
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(scan_record, "SETTLE_NS", 0)
    return tmp_path / "cache"


@pytest.fixture
def leaves(tmp_path: Path) -> Path:
    return synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=6, size=32, seed=0))


def _record_of(cache: Path) -> Path:
    (record,) = (cache / scan_record.FOLDER).glob("*.json")
    return record


def _rewrite_keeping_size_and_times(path: Path, data: bytes) -> None:
    """``data`` written over ``path`` in place, with its size (padded or cut) and its access and modification times
    put back: only the change time, which no user can set, tells the file changed."""
    before = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(data[:before.st_size].ljust(before.st_size, b"\0"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns


def test_a_second_scan_reads_no_image_and_gives_the_same_hash(cache: Path, leaves: Path) -> None:
    full = scan_image_folder(leaves)
    first = scan_image_folder(leaves, record="use")
    second = scan_image_folder(leaves, record="use")

    assert (first.unchanged, second.unchanged) == (0, 12)
    assert first.content_hash == second.content_hash == full.content_hash
    assert second.samples == full.samples and second.classes == full.classes
    assert _record_of(cache).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("change", ["same size and times", "renamed over", "another image's bytes"])
def test_an_image_changed_behind_its_size_and_times_is_read_again(cache: Path, leaves: Path, change: str) -> None:
    scan_image_folder(leaves, record="use")
    target = leaves / "healthy" / "healthy_0000.png"
    other = leaves / "diseased" / "diseased_0001.png"
    if change == "same size and times":
        _rewrite_keeping_size_and_times(target, other.read_bytes())
    elif change == "renamed over":
        times = os.stat(target)
        shutil.copyfile(other, leaves / "copy.tmp")
        os.replace(leaves / "copy.tmp", target)
        os.utime(target, ns=(times.st_atime_ns, times.st_mtime_ns))
    else:
        shutil.copyfile(other, target)

    again = scan_image_folder(leaves, record="use")

    assert again.unchanged == 11
    assert again.content_hash == scan_image_folder(leaves).content_hash


def test_an_image_damaged_since_fails_the_scan_that_trusts_the_record(cache: Path, leaves: Path) -> None:
    scan_image_folder(leaves, record="use")
    target = leaves / "healthy" / "healthy_0003.png"
    _rewrite_keeping_size_and_times(target, target.read_bytes()[:100])

    with pytest.raises(DataError, match="healthy_0003.png: cannot be decoded"):
        scan_image_folder(leaves, record="use")


@pytest.mark.parametrize("damage", [
    "cut short", "not utf-8", "not json", "null", "a list", "another format", "another folder",
    "an entry of five", "a bool for a size", "a digest too short", "a digest not hex", "nested deep",
])
def test_a_damaged_record_is_ignored_and_written_again(cache: Path, leaves: Path, damage: str) -> None:
    scan_image_folder(leaves, record="use")
    record = _record_of(cache)
    content = json.loads(record.read_text())
    entry = next(iter(content["files"]))
    raw = record.read_bytes()
    damaged = {
        "cut short": raw[: len(raw) // 2],
        "not utf-8": b"\xff\xfe" + raw,
        "not json": b"{format: 1}",
        "null": b"null",
        "a list": b"[1, 2]",
        "another format": json.dumps({**content, "format": 2}).encode(),
        "another folder": json.dumps({**content, "folder": "/elsewhere"}).encode(),
        "an entry of five": json.dumps({**content, "files": {**content["files"], entry: content["files"][entry][:5]}}).encode(),
        "a bool for a size": json.dumps({**content, "files": {**content["files"], entry: [True, *content["files"][entry][1:]]}}).encode(),
        "a digest too short": json.dumps({**content, "files": {**content["files"], entry: [*content["files"][entry][:5], "ab"]}}).encode(),
        "a digest not hex": json.dumps({**content, "files": {**content["files"], entry: [*content["files"][entry][:5], "z" * 64]}}).encode(),
        "nested deep": b"[" * 100_000 + b"]" * 100_000,
    }[damage]
    record.write_bytes(damaged)

    after_damage = scan_image_folder(leaves, record="use")
    after_repair = scan_image_folder(leaves, record="use")

    assert after_damage.unchanged == 0
    assert after_damage.content_hash == scan_image_folder(leaves).content_hash
    assert after_repair.unchanged == 12


def _forge(record: Path, relative: str) -> None:
    """The record's digest of ``relative`` replaced by one of other bytes (another user's doing, or a disk's)."""
    content = json.loads(record.read_text())
    content["files"][relative][5] = "00" * 32
    record.write_text(json.dumps(content))


@pytest.mark.parametrize(("mode", "trusted"), [(0o600, True), (0o620, False), (0o602, False)])
def test_a_record_another_user_could_have_written_is_not_trusted(cache: Path, leaves: Path, mode: int, trusted: bool) -> None:
    true_hash = scan_image_folder(leaves, record="use").content_hash
    record = _record_of(cache)
    _forge(record, "healthy/healthy_0000.png")
    record.chmod(mode)

    scan = scan_image_folder(leaves, record="use")

    # the owner's own record is believed (what makes it worth forging); one others could write is not
    assert (scan.content_hash != true_hash) is trusted
    assert scan.unchanged == (12 if trusted else 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root (CI runs as root)")
def test_a_record_owned_by_another_user_is_not_trusted(cache: Path, leaves: Path) -> None:
    true_hash = scan_image_folder(leaves, record="use").content_hash
    record = _record_of(cache)
    _forge(record, "healthy/healthy_0000.png")
    os.chown(record, 12345, 12345)

    assert scan_image_folder(leaves, record="use").content_hash == true_hash


def test_a_link_in_place_of_the_record_is_not_followed(cache: Path, leaves: Path, tmp_path: Path) -> None:
    true_hash = scan_image_folder(leaves, record="use").content_hash
    record = _record_of(cache)
    _forge(record, "healthy/healthy_0000.png")
    forged = record.rename(tmp_path / "forged.json")
    record.symlink_to(forged)

    assert scan_image_folder(leaves, record="use").content_hash == true_hash


def test_inspect_reads_every_byte_whatever_the_record_says_and_renews_it(cache: Path, leaves: Path, capsys) -> None:
    """A disk's silent damage keeps a file's stat: only a scan that reads every byte sees it."""
    true_hash = scan_image_folder(leaves, record="use").content_hash
    _forge(_record_of(cache), "diseased/diseased_0002.png")
    assert scan_image_folder(leaves, record="use").content_hash != true_hash

    assert main(["data", "inspect", str(leaves)]) in (0, None)

    assert f"hash\t{true_hash}" in capsys.readouterr().out
    assert scan_image_folder(leaves, record="use").content_hash == true_hash


def test_images_changed_less_than_the_settling_time_before_a_scan_are_read_again(cache: Path, leaves: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A change within the clock's tick after the scan's stat could leave the same stat: git's racily clean files."""
    monkeypatch.setattr(scan_record, "SETTLE_NS", 60 * 10**9)
    scan_image_folder(leaves, record="use")
    assert scan_image_folder(leaves, record="use").unchanged == 0


def test_a_record_that_cannot_be_written_leaves_the_scan_as_it_was(cache: Path, leaves: Path) -> None:
    cache.mkdir()
    (cache / scan_record.FOLDER).write_text("a file in the way")
    full = scan_image_folder(leaves)

    scans = [scan_image_folder(leaves, record="use") for _ in range(2)]

    assert [(scan.content_hash, scan.unchanged) for scan in scans] == [(full.content_hash, 0)] * 2


def test_names_that_are_not_utf8_are_recorded_as_their_bytes(cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "latin1"
    made = synth.generate(tmp_path / "made", synth.SynthSpec(per_class=3, size=16, seed=1))
    for class_name, odd in (("healthy", b"caf\xe9"), ("diseased", b"\xfcbel")):
        os.makedirs(os.fsencode(folder) + b"/" + odd)
        for image in (made / class_name).iterdir():
            shutil.copyfile(image, os.fsencode(folder) + b"/" + odd + b"/" + os.fsencode(image.name))

    first = scan_image_folder(folder, record="use")
    second = scan_image_folder(folder, record="use")

    assert second.unchanged == 6 and second.content_hash == first.content_hash == scan_image_folder(folder).content_hash


def test_records_unused_for_thirty_days_are_removed_and_used_ones_kept(cache: Path, leaves: Path) -> None:
    scan_image_folder(leaves, record="use")
    record = _record_of(cache)
    stale = [cache / scan_record.FOLDER / ("0" * 32 + ".json"), cache / scan_record.FOLDER / ".x.json.abc.tmp"]
    long_ago = time.time() - 31 * 86400
    for path in (*stale, record):
        path.touch()
        os.utime(path, (long_ago, long_ago))

    assert scan_image_folder(leaves, record="use").unchanged == 12  # used: its time is now

    assert not any(path.exists() for path in stale)
    assert record.stat().st_mtime > long_ago + 86400


WRITER = """
import sys
from plantml.datasets import scan_record
from plantml.training.data import scan_image_folder
scan_record.SETTLE_NS = 0
print(*(scan_image_folder(sys.argv[1], record=sys.argv[2]).content_hash for _ in range(4)))
"""


def test_trainings_scanning_one_folder_at_once_each_get_its_hash_and_leave_a_whole_record(cache: Path, leaves: Path) -> None:
    """Four processes (the ranks of a job on one machine, a sweep) each scan the folder four times over while the
    others write its record, half of them renewing it: each scan gives the hash of a full read, and the record ends
    whole (trusted by the next scan) with nothing left aside."""
    import subprocess
    import sys

    full = scan_image_folder(leaves).content_hash
    scanners = [subprocess.Popen([sys.executable, "-c", WRITER, str(leaves), mode], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}) for mode in ("use", "renew") * 2]
    outputs = [scanner.communicate(timeout=300)[0].split() for scanner in scanners]

    assert [scanner.returncode for scanner in scanners] == [0] * 4
    assert outputs == [[full] * 4] * 4
    assert scan_image_folder(leaves, record="use").unchanged == 12
    assert [path.name for path in (cache / scan_record.FOLDER).iterdir()] == [_record_of(cache).name]  # nothing aside


def test_the_scan_shows_its_progress_over_every_image(cache: Path, leaves: Path) -> None:
    seen: list[tuple[int, Path]] = []

    def progress(images, *, total):
        assert total == 12
        for image in images:
            seen.append(image)
            yield image

    scan = scan_image_folder(leaves, progress=progress)

    assert [path for _, path in seen] == [path for path, _ in scan.samples]
    assert scan.content_hash == scan_image_folder(leaves).content_hash


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_inspect_draws_a_scan_bar_on_a_terminal_only(leaves: Path, terminal: bool) -> None:
    """A first scan of 50,000 photos takes half a minute: on a terminal a bar says how far it is, then is gone; a log
    or a pipe gets the same lines as before."""
    import subprocess
    import sys

    if terminal:
        import fcntl
        import struct
        import termios

        controller, stderr = os.openpty()
        fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new one is 0 columns wide
    else:
        controller, stderr = os.pipe()
    done = subprocess.run([sys.executable, "-m", "plantml", "data", "inspect", str(leaves)], stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=120)
    os.close(stderr)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # a terminal whose other end closed (EIO)
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)

    assert done.returncode == 0 and done.stdout.splitlines()[-2] == "total\t12"
    assert (b"scan: " in shown and b"/12 [" in shown) is terminal, shown
    assert shown.endswith(b" \r") if terminal else shown == b""  # the bar is wiped once done


def test_train_gives_its_scan_the_same_bar_on_a_terminal_only() -> None:
    from tqdm import tqdm

    from plantml.cli.train import _console_reporter

    images = [("healthy", 1), ("healthy", 2)]
    assert isinstance(_console_reporter(True).images(images, total=2), tqdm)
    assert _console_reporter(False).images(images, total=2) is images
