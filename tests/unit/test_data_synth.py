"""The synthetic leaf set: layout, determinism, and the cache ``plantml train`` uses."""

from __future__ import annotations

import pytest

from plantml.errors import UsageError
from plantml.training import synth
from plantml.training.data import scan_image_folder


def test_generates_two_classes_in_imagefolder_layout(tmp_path):
    synth.generate(tmp_path, synth.SynthSpec(per_class=5, size=32, seed=1))

    scan = scan_image_folder(tmp_path)

    assert scan.classes == ("diseased", "healthy")
    assert scan.class_counts() == {"diseased": 5, "healthy": 5}
    assert synth.is_synthetic(tmp_path)


def test_same_seed_gives_byte_identical_files(tmp_path):
    spec = synth.SynthSpec(per_class=4, size=32, seed=7)
    first = scan_image_folder(synth.generate(tmp_path / "a", spec)).content_hash
    second = scan_image_folder(synth.generate(tmp_path / "b", spec)).content_hash

    assert first == second


def test_another_seed_gives_another_set(tmp_path):
    a = scan_image_folder(synth.generate(tmp_path / "a", synth.SynthSpec(per_class=4, size=32, seed=1)))
    b = scan_image_folder(synth.generate(tmp_path / "b", synth.SynthSpec(per_class=4, size=32, seed=2)))

    assert a.content_hash != b.content_hash


def test_cache_is_generated_once_under_plantml_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    spec = synth.SynthSpec(per_class=3, size=16, seed=0)

    first = synth.ensure_cached(spec)
    stamp = (first / "healthy" / "healthy_0000.png").stat().st_mtime_ns
    second = synth.ensure_cached(spec)

    assert first == second == tmp_path / "cache" / spec.name
    assert (second / "healthy" / "healthy_0000.png").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [spec.name]  # no staging left behind


@pytest.mark.parametrize("damage", ["cut short", "rewritten", "removed"])
def test_a_damaged_cached_set_is_drawn_again_with_a_warning(tmp_path, monkeypatch, caplog, damage):
    """Was: an image cut short stopped every training with ``cannot be decoded …; use --skip-bad-images`` (advice
    about a folder plantml owns), and one removed trained on 5 images with another digest, silently."""
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    spec = synth.SynthSpec(per_class=3, size=16, seed=0)
    cached = synth.ensure_cached(spec)
    drawn = {path.relative_to(cached): path.read_bytes() for path in cached.rglob("*.png")}
    image = cached / "healthy" / "healthy_0001.png"
    if damage == "cut short":
        image.write_bytes(image.read_bytes()[:40])
    elif damage == "rewritten":
        image.write_bytes(drawn[image.relative_to(cached)][::-1])
    else:
        image.unlink()

    with caplog.at_level("WARNING", logger="plantml.training.synth"):
        again = synth.ensure_cached(spec)

    assert again == cached and {path.relative_to(cached): path.read_bytes() for path in cached.rglob("*.png")} == drawn
    assert caplog.messages == [f"the cached synthetic data set {cached}: its images changed on disk since it was "
                               "drawn; drawing it again"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [spec.name]  # neither the old set nor a staging left
    caplog.clear()
    assert synth.ensure_cached(spec) == cached and caplog.messages == []  # whole again: taken as it is


def test_a_set_cached_before_its_digest_was_recorded_is_taken_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    spec = synth.SynthSpec(per_class=3, size=16, seed=0)
    cached = synth.ensure_cached(spec)
    (cached / ".plantml-synthetic").write_text(f"{spec.name}\n")  # as plantml wrote it before
    stamp = (cached / "healthy" / "healthy_0000.png").stat().st_mtime_ns

    assert synth.ensure_cached(spec) == cached
    assert (cached / "healthy" / "healthy_0000.png").stat().st_mtime_ns == stamp


def test_default_set_matches_the_design_sizes():
    spec = synth.SynthSpec()

    assert (spec.per_class * len(synth.CLASSES), spec.size) == (400, 96)


@pytest.mark.parametrize("kwargs", [{"per_class": 2}, {"size": 8}])
def test_rejects_unusable_parameters(kwargs):
    with pytest.raises(UsageError):
        synth.SynthSpec(**kwargs)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from plantml.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_data_synth_refuses_a_folder_of_other_files_and_touches_nothing(tmp_path, capsys):
    (tmp_path / "healthy").mkdir()
    mine = tmp_path / "healthy" / "healthy_0000.png"
    mine.write_bytes(b"the user's own photo")

    code, _, err = run_cli(capsys, "data", "synth", str(tmp_path), "--per-class", "3", "--size", "16")

    assert code == 2
    assert err.splitlines() == [f"plantml: error: folder {tmp_path}: not empty and not a synthetic set; give an empty or new folder"]
    assert mine.read_bytes() == b"the user's own photo"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["healthy", "healthy_0000.png"]  # no marker, no class added


def test_data_synth_writes_into_an_empty_folder_and_over_a_synthetic_set(tmp_path, capsys):
    assert run_cli(capsys, "data", "synth", str(tmp_path), "--per-class", "3", "--size", "16")[0] == 0
    code, out, _ = run_cli(capsys, "data", "synth", str(tmp_path), "--per-class", "4", "--size", "16")

    assert code == 0 and "8 images (diseased 4, healthy 4)" in out
    assert synth.is_synthetic(tmp_path) and not [p for p in tmp_path.iterdir() if ".staging-" in p.name]



def test_data_synth_refuses_a_synthetic_set_with_files_added_and_removes_none(tmp_path, capsys):
    assert run_cli(capsys, "data", "synth", str(tmp_path), "--per-class", "3", "--size", "16")[0] == 0
    photo = tmp_path / "healthy" / "my_photo.jpg"
    photo.write_bytes(b"the user's own photo")
    (tmp_path / "roses").mkdir()
    rose = tmp_path / "roses" / "rose_1.png"
    rose.write_bytes(b"another photo")

    code, _, err = run_cli(capsys, "data", "synth", str(tmp_path), "--per-class", "4", "--size", "16")

    assert code == 2 and len(err.splitlines()) == 1 and str(photo) in err
    assert photo.read_bytes() == b"the user's own photo" and rose.read_bytes() == b"another photo"
    assert sorted(p.name for p in (tmp_path / "healthy").iterdir()) == ["healthy_0000.png", "healthy_0001.png",
                                                                        "healthy_0002.png", "my_photo.jpg"]


def test_data_synth_writes_a_quoted_tilde_folder_into_home_as_train_reads_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    code, out, _ = run_cli(capsys, "data", "synth", "~/leaves", "--per-class", "3", "--size", "16")

    assert code == 0 and "6 images (diseased 3, healthy 3)" in out
    assert synth.is_synthetic(tmp_path / "home" / "leaves") and not (tmp_path / "~").exists()

def full_disk_after(monkeypatch, images: int) -> None:
    """Make PIL's PNG writes fail as a full disk does, after ``images`` of them."""
    import errno

    from PIL import Image

    save, done = Image.Image.save, []

    def save_until_full(self, *args, **kwargs):
        if len(done) >= images:
            raise OSError(errno.ENOSPC, "No space left on device")
        done.append(1)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)


def test_data_synth_over_a_larger_synthetic_set_leaves_only_the_new_set(tmp_path):
    target = tmp_path / "leaves"
    synth.write_set(target, synth.SynthSpec(per_class=6, size=16, seed=0))

    synth.write_set(target, synth.SynthSpec(per_class=3, size=16, seed=0))

    assert scan_image_folder(target).class_counts() == {"diseased": 3, "healthy": 3}
    fresh = scan_image_folder(synth.generate(tmp_path / "fresh", synth.SynthSpec(per_class=3, size=16, seed=0)))
    assert scan_image_folder(target).content_hash == fresh.content_hash


def test_a_second_data_synth_into_a_folder_being_written_waits_then_writes_over_it(tmp_path):
    import fcntl
    import os
    import tempfile
    import threading

    from plantml.processes import process_start_time

    target = tmp_path / "leaves"
    target.mkdir()
    # another synth, mid-write: it holds the folder and its staging folder is there, no marker yet
    tempfile.mkdtemp(prefix=f".plantml-synth.staging-{os.getpid()}-{process_start_time(os.getpid())}-", dir=target)
    other = os.open(target, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    outcome = []
    second = threading.Thread(target=lambda: outcome.append(_run(synth.write_set, target, synth.SynthSpec(per_class=3, size=16))))
    second.start()
    second.join(0.5)
    waited = second.is_alive()
    for staging in target.glob(".plantml-synth.staging-*"):  # the other synth completes its set
        staging.rmdir()
    synth.generate(target, synth.SynthSpec(per_class=6, size=16))
    os.close(other)
    second.join(30)

    assert waited and outcome == [target]
    assert scan_image_folder(target).class_counts() == {"diseased": 3, "healthy": 3}


def _run(function, *args):
    try:
        return function(*args)
    except UsageError as exc:
        return exc


@pytest.mark.parametrize("existing", [False, True])
def test_data_synth_on_a_full_disk_is_one_line_and_leaves_the_folder_as_it_was(tmp_path, capsys, monkeypatch, existing):
    target = tmp_path / "set"
    if existing:
        target.mkdir()
    full_disk_after(monkeypatch, 4)

    code, _, err = run_cli(capsys, "data", "synth", str(target), "--per-class", "3", "--size", "16")

    assert code == 1
    assert err.splitlines() == [f"plantml: error: folder {target}: no space left on device"]
    assert (list(target.iterdir()) == []) if existing else not target.exists()


def test_the_cached_set_on_a_full_disk_is_one_line_naming_the_cache(tmp_path, monkeypatch):
    from plantml.errors import StorageError

    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path))
    full_disk_after(monkeypatch, 2)

    with pytest.raises(StorageError, match=rf"^cache folder \(PLANTML_CACHE_DIR\) {tmp_path}: no space left on device$"):
        synth.ensure_cached(synth.SynthSpec(per_class=3, size=16, seed=0))
    assert list(tmp_path.iterdir()) == []


def test_a_cache_folder_that_is_a_file_is_one_line_naming_it(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file")
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))

    with pytest.raises(UsageError, match=rf"^cache folder \(PLANTML_CACHE_DIR\) {tmp_path / 'cache'}: "):
        synth.ensure_cached(synth.SynthSpec(per_class=3, size=16, seed=0))
