"""Inputs that used to fail late or loudly: each is now one line before any work, or trains.

A batch of one image, non-finite learning rates and weight decays, an ``--output-dir`` that
cannot be written, an image file that cannot be read, a very large image, and SIGTERM while
the data set is being made.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from _tempdir import left_in
from PIL import Image

from plantml.cli import main
from plantml.errors import DataError
from plantml.training import synth
from plantml.training.data import build_loaders, scan_image_folder, stratified_split
from plantml.training.device_data import DeviceLoader

TINY = ["--epochs", "1", "--image-size", "32", "--weights", "none", "--num-workers", "0", "--no-mlflow"]


@pytest.fixture(scope="module")
def leaves(tmp_path_factory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=12, size=32, seed=0))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--weight-decay", "nan"], "--weight-decay nan: must be a finite number"),
    (["--weight-decay", "inf"], "--weight-decay inf: must be a finite number"),
    (["--learning-rate", "inf"], "--learning-rate inf: must be a finite number"),
    (["--learning-rate", "1e309"], "--learning-rate inf: must be a finite number"),
    (["--batch-size", "1"], "--batch-size 1 at --image-size 32"),
    # was refused by the registry after the whole training, naming the artifact ('model') instead
    (["--registered-model-name", "a:b"], "--registered-model-name 'a:b': MLflow's registry refuses '/', ':'"),
    (["--registered-model-name", "team/leaves"], "--registered-model-name 'team/leaves': MLflow's registry refuses"),
    (["--registered-model-name", " "], "--registered-model-name ' ': must be a non-empty name"),
])
def test_a_value_that_cannot_train_is_one_line_before_any_work(capsys, leaves, args, expected):
    code = main(["train", "--data-dir", str(leaves), *TINY, *args])

    assert code == 2
    assert expected in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("place", ["under a file", "in /proc"])
def test_an_output_dir_that_cannot_be_written_is_refused_before_the_training(capsys, leaves, place):
    output = leaves / "healthy" / "healthy_0000.png" / "out" if place == "under a file" else Path("/proc/plantml-out")

    code = main(["train", "--data-dir", str(leaves), *TINY, "--output-dir", str(output)])

    captured = capsys.readouterr()
    assert code == 2
    assert f"--output-dir {output}: cannot write there" in _one_line(captured.err)
    assert "epoch" not in captured.out  # refused before any epoch



def test_a_quoted_tilde_output_dir_is_the_home_folder_as_for_data_dir(capsys, leaves, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    code = main(["train", "--data-dir", str(leaves), *TINY, "--output-dir", "~/out"])

    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "home" / "out" / "best_model.pth").is_file() and not (tmp_path / "~").exists()


def test_an_output_dir_that_fills_up_after_the_training_is_one_line_and_no_truncated_checkpoint(
        capsys, leaves, tmp_path, files_of_at_most_one_mib):
    output = tmp_path / "out"

    code = main(["train", "--data-dir", str(leaves), *TINY, "--output-dir", str(output)])

    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == f"plantml: error: --output-dir {output}: file too large"
    assert list(output.iterdir()) == []  # neither a cut best_model.pth nor its partial file

def _train_size(folder: Path) -> int:
    scan = scan_image_folder(folder)
    return len(stratified_split([label for _, label in scan.samples], 0.15, 0.15, seed=42).train)


def test_a_last_training_batch_of_one_image_is_left_out_so_batch_norm_trains(capsys, leaves):
    # at 32 px every backbone's last feature map is 1x1: batch norm cannot train on one image there
    batch_size = _train_size(leaves) - 1  # the epoch's last batch would hold one image

    code = main(["train", "--data-dir", str(leaves), *TINY, "--batch-size", str(batch_size)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "epoch 1/1" in captured.out


def test_both_loaders_leave_out_only_a_lone_last_training_image(leaves):
    scan = scan_image_folder(leaves)
    split = stratified_split([label for _, label in scan.samples], 0.15, 0.15, seed=42)
    batch_size = len(split.train) - 1
    loaders = build_loaders(scan, split, image_size=32, batch_size=batch_size, num_workers=0, seed=0)
    assert [len(labels) for _, labels in loaders.train] == [batch_size]
    assert len(loaders.train) == 1
    assert [len(labels) for _, labels in loaders.val] == [len(split.val)]  # evaluation keeps every image

    images, labels = torch.zeros(9, 3, 8, 8, dtype=torch.uint8), torch.arange(9)
    cpu = torch.device("cpu")
    train = DeviceLoader(images, labels, batch_size=4, device=cpu, train=True)
    assert [len(batch_labels) for _, batch_labels in train] == [4, 4] and len(train) == 2
    evaluation = DeviceLoader(images, labels, batch_size=4, device=cpu, train=False)
    assert [len(batch_labels) for _, batch_labels in evaluation] == [4, 4, 1] and len(evaluation) == 3
    ten = DeviceLoader(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.arange(10), batch_size=3, device=cpu, train=True)
    assert [len(batch_labels) for _, batch_labels in ten] == [3, 3, 3]


@pytest.fixture
def unreadable(tmp_path) -> Path:
    """A set with one image file whose read fails in the kernel, for any user (root ignores chmod 000)."""
    folder = synth.generate(tmp_path / "set", synth.SynthSpec(per_class=6, size=24, seed=0))
    (folder / "healthy" / "locked.png").symlink_to("/proc/self/mem")  # a regular file; reading it gives EIO
    return folder


def test_an_image_that_cannot_be_read_is_named_in_one_line(capsys, unreadable):
    with pytest.raises(DataError, match=r"locked.png: cannot be read \(Input/output error\); use --skip-bad-images"):
        scan_image_folder(unreadable)

    code = main(["train", "--data-dir", str(unreadable), *TINY])
    assert code == 2
    assert "locked.png: cannot be read" in _one_line(capsys.readouterr().err)


def test_skip_bad_images_leaves_out_an_image_that_cannot_be_read_and_names_one(capsys, unreadable):
    scan = scan_image_folder(unreadable, skip_bad_images=True)
    assert [path.name for path in scan.skipped] == ["locked.png"]

    assert main(["train", "--data-dir", str(unreadable), *TINY, "--skip-bad-images"]) == 0
    locked = unreadable / "healthy" / "locked.png"
    assert f"plantml: warning: 1 unreadable image(s) skipped (such as {locked})" in capsys.readouterr().err
    assert main(["data", "inspect", str(unreadable), "--skip-bad-images"]) == 0
    assert f"skipped\t1 unreadable (such as {locked})" in capsys.readouterr().out.splitlines()


def test_a_file_name_with_a_newline_stays_on_the_one_line_that_names_it(capsys, tmp_path):
    folder = synth.generate(tmp_path / "set", synth.SynthSpec(per_class=4, size=24, seed=0))
    (folder / "healthy" / "bad\nname\x01.png").write_bytes(b"not an image")

    assert main(["train", "--data-dir", str(folder), *TINY]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"plantml: error: image {folder / 'healthy'}/bad\\nname\\x01.png: ")


@pytest.mark.parametrize("args, expected", [
    (["--val-split", "15"], "split fractions val=15.0, test=0.15: each must be in (0, 1)"),
    (["--val-split", "0.5", "--test-split", "0.5"], "split fractions val=0.5, test=0.5: each must be in (0, 1)"),
    (["--data-dir", ""], "--data-dir is empty: give a folder or s3://BUCKET/PREFIX"),
])
def test_split_fractions_and_an_empty_data_dir_are_refused_before_the_images_are_read(capsys, tmp_path, monkeypatch,
                                                                                     args, expected):
    """Checked with the other flags, not after a scan that decodes every image (minutes on a large set): the bad
    image here would be the error otherwise. An empty --data-dir ("$UNSET") would have trained on the current folder."""
    folder = synth.generate(tmp_path / "set", synth.SynthSpec(per_class=4, size=24, seed=0))
    (folder / "healthy" / "broken.png").write_bytes(b"not an image")
    monkeypatch.chdir(folder)

    assert main(["train", "--data-dir", str(folder), *TINY, *args]) == 2
    assert expected in _one_line(capsys.readouterr().err)


def test_a_very_large_image_is_one_warning_line_naming_it(tmp_path, caplog, monkeypatch):
    folder = synth.generate(tmp_path / "set", synth.SynthSpec(per_class=4, size=24, seed=0))
    Image.new("RGB", (60, 60), (20, 120, 30)).save(folder / "healthy" / "huge.png")
    # Pillow warns above MAX_IMAGE_PIXELS (89 MP by default) and refuses above twice that
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)

    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.WARNING, logger="plantml.training"):
        warnings.simplefilter("always")
        scan = scan_image_folder(folder)

    assert len(scan.samples) == 9
    assert [record.getMessage() for record in caplog.records] == [
        f"image {folder / 'healthy' / 'huge.png'}: Image size (3600 pixels) exceeds limit of 2000 pixels"]
    assert not [w for w in shown if issubclass(w.category, Image.DecompressionBombWarning)]


def test_files_of_other_formats_linked_folders_and_fifos_left_out_of_the_set_are_one_warning_line_each(tmp_path, caplog):
    folder = synth.generate(tmp_path / "set", synth.SynthSpec(per_class=4, size=24, seed=0))
    Image.new("RGB", (24, 24), (20, 120, 30)).save(folder / "healthy" / "photo.gif")  # Pillow reads it; plantml does not
    (folder / "diseased" / "notes.txt").write_text("field notes")
    (folder / "diseased" / ".DS_Store").write_bytes(b"hidden: not counted")
    # were left out without a word: a linked sub-folder of a class (not followed), a FIFO named like an image
    elsewhere = synth.generate(tmp_path / "elsewhere", synth.SynthSpec(per_class=3, size=24, seed=1))
    (folder / "healthy" / "more").symlink_to(elsewhere / "healthy", target_is_directory=True)
    os.mkfifo(folder / "healthy" / "pipe.jpg")

    with caplog.at_level(logging.WARNING, logger="plantml.training"):
        scan = scan_image_folder(folder)

    assert len(scan.samples) == 8
    assert sorted(record.getMessage() for record in caplog.records) == [
        f"1 file(s) left out of the set: linked folders inside a class folder are not followed (such as {folder / 'healthy' / 'more'})",
        f"1 file(s) left out of the set: not regular files (such as {folder / 'healthy' / 'pipe.jpg'})",
        f"2 file(s) left out of the set: not .jpg/.jpeg/.png/.ppm/.bmp/.pgm/.tif/.tiff/.webp (such as {folder / 'diseased' / 'notes.txt'})"]


def test_files_beside_the_class_folders_are_one_warning_line_and_a_link_to_nothing_is_named(tmp_path, caplog, capsys):
    """Were: a photo at the set's top left out without a word; a ``.jpg`` link to nothing "not .jpg/..."."""
    folder = synth.generate(tmp_path / "set", synth.SynthSpec(per_class=4, size=24, seed=0))
    Image.new("RGB", (24, 24), (20, 120, 30)).save(folder / "loose.jpg")
    (folder / "README.md").write_text("what these leaves are")

    with caplog.at_level(logging.WARNING, logger="plantml.training"):
        assert len(scan_image_folder(folder).samples) == 8
    assert [record.getMessage() for record in caplog.records] == [
        f"2 file(s) left out of the set: not in a class folder (such as {folder / 'README.md'})"]

    (folder / "healthy" / "moved.jpg").symlink_to(tmp_path / "gone.jpg")
    assert main(["data", "inspect", str(folder)]) == 2
    *warnings, error = capsys.readouterr().err.strip().splitlines()  # the warning above is printed too
    assert f"image {folder / 'healthy' / 'moved.jpg'}: cannot be read" in error
    assert all(line.startswith("plantml: warning: 2 file(s) left out") for line in warnings)


def test_sigterm_while_the_synthetic_set_is_made_is_one_line_and_leaves_no_staging_folder(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PLANTML_CACHE_DIR": str(cache)}
    process = subprocess.Popen([sys.executable, "-m", "plantml", "train", *TINY], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (cache.is_dir() and any(path.name.startswith(".") for path in cache.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, "no staging folder appeared"
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)  # the set takes about a second to make: this lands while it is made
    out, err = process.communicate(timeout=60)

    assert process.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in _one_line(err)
    assert "epoch" not in out
    assert not [path.name for path in cache.iterdir() if path.name.startswith(".")]


def test_a_signal_landing_just_after_the_staging_folder_is_made_still_removes_it(tmp_path, monkeypatch):
    """Was: tempfile.mkdtemp ran Python code after its mkdir, before the clean-up's try was entered: a SIGTERM landing
    there (the test above, once in CI) left the folder. Here the stop is raised by the mkdir itself, once it made it."""
    from plantml.errors import Interrupted
    from plantml.staging import staging_folder

    make_folder = os.mkdir

    def made_then_stopped(path, *args, **kwargs):
        make_folder(path, *args, **kwargs)
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(os, "mkdir", made_then_stopped)
    with pytest.raises(Interrupted):
        with staging_folder(tmp_path, "synthetic-leaves"):
            pass
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri, shown", [
    ("sqlite:////etc/passwd/mlflow.db", "tracking URI 'sqlite:////etc/passwd/mlflow.db' (from argument): cannot open the store"),
    ("postgresql://user:secret@127.0.0.1:1/db", "tracking URI 'postgresql://user:***@127.0.0.1:1/db' (from argument): needs"),
])
def test_a_tracking_store_mlflow_cannot_open_is_one_line_without_its_password(capsys, leaves, uri, shown):
    tracked = [arg for arg in TINY if arg != "--no-mlflow"]
    code = main(["train", "--data-dir", str(leaves), *tracked, "--tracking-uri", uri])

    line = _one_line(capsys.readouterr().err)
    assert code == 1
    assert line.startswith(f"plantml: error: {shown}") and "secret" not in line


def test_a_training_without_output_dir_sweeps_the_temporary_folder_a_killed_one_left(leaves, killed_leftover):
    """Its checkpoint went to a plantml-train-* folder that a kill -9 left in /tmp for good (a resnet50's: 100 MB)."""
    temp = killed_leftover("plantml-train")

    assert main(["train", "--data-dir", str(leaves), *TINY]) == 0

    assert left_in(temp) == []  # the dead one's swept, this one's removed


def test_a_training_writes_and_logs_its_output_dir_pair_while_no_other_training_writes_there(leaves, tmp_path):
    """A sweep given one --output-dir: a training that wrote its checkpoint could log the other one's, written in
    between; the folder is now locked from the first write until the checkpoint is copied into the run's spool."""
    from plantml.staging import folder_lock

    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out):  # another training writing its pair
        training = subprocess.Popen([sys.executable, "-m", "plantml", "train", "--data-dir", str(leaves), *TINY,
                                     "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = training.stdout.readline()  # its one epoch is done; the test split, then it waits for the lock
        time.sleep(3)
        ended_early = training.poll()
        written_meanwhile = sorted(path.name for path in out.iterdir())
    _, err = training.communicate(timeout=120)

    assert first.startswith("epoch 1/1"), err
    assert ended_early is None and written_meanwhile == [], err
    assert training.returncode == 0, err
    assert sorted(path.name for path in out.iterdir()) == ["best_model.pth", "training_history.json"]


@pytest.mark.parametrize(("case", "args", "env", "expected"), [
    ("missing folder", ["train", "--data-dir", "{tmp}/nowhere"], {}, "data folder {tmp}/nowhere: not found"),
    ("one class", ["train", "--data-dir", "{tmp}/one"], {},
     "data folder {tmp}/one: need at least two class sub-folders, found 1 (healthy)"),
    ("home a file", ["train"], {"HOME": "/dev/null"},
     "cache folder (PLANTML_CACHE_DIR) /dev/null/.cache/plantml: not a directory"),
    ("journal under a file", ["train"], {"PLANTML_CACHE_DIR": "{tmp}/cache", "PLANTML_JOURNAL_DIR": "/dev/null/journal"},
     "journal folder (PLANTML_JOURNAL_DIR) /dev/null/journal: not a directory"),
    ("uri typo", ["train"], {"MLFLOW_TRACKING_URI": "htp://127.0.0.1:5000"},
     "tracking URI 'htp://127.0.0.1:5000' (from environment (MLFLOW_TRACKING_URI)): unknown scheme 'htp' (use http, "
     "https, sqlite, postgresql or file)"),
    ("push of a missing folder", ["data", "push", "{tmp}/nowhere", "s3://plants-images/x"],
     {"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"},
     "data folder {tmp}/nowhere: not found"),
])
def test_input_errors_that_need_neither_torch_nor_mlflow_are_said_before_either_is_imported(tmp_path, case, args, env,
                                                                                             expected):
    """Was: each said after torch's, torchvision's and MLflow's import, 9 s here for a mistyped --data-dir."""
    (tmp_path / "one" / "healthy").mkdir(parents=True)
    done = _before_loading(tmp_path, args, env)
    assert done.stderr.splitlines() == [f"plantml: error: {expected.format(tmp=tmp_path)}"], done.stderr
    assert done.stdout.split(None, 1) == ["2", "[]\n"]


def _before_loading(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``plantml ARGS`` in a process that prints its exit code and which of torch, torchvision and mlflow it imported."""
    probe = ("import sys\nfrom plantml.cli import main\ncode = main(sys.argv[1:])\n"
             "print(code, sorted({'torch', 'torchvision', 'mlflow'} & set(sys.modules)))\n")
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith(("PLANTML_", "MLFLOW_", "AWS_"))},
               **{k: v.format(tmp=tmp_path) for k, v in env.items()}}
    return subprocess.run([sys.executable, "-c", probe, *(a.format(tmp=tmp_path) for a in args)], env=environ,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_a_tracking_server_that_does_not_answer_is_said_before_the_data_is_made_or_torch_imported(tmp_path):
    """Was: said after the imports, the synthetic set's making and the tracker's wait, 26 s here; now after the wait
    and MLflow's import (12 s). The port is closed: connection refused, as when the stack is down."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    done = _before_loading(tmp_path, ["train"], {"MLFLOW_TRACKING_URI": uri, "PLANTML_CACHE_DIR": "{tmp}/cache"})

    assert done.stderr.splitlines() == [f"plantml: error: {uri}: tracking server not reachable (ConnectionError); "
                                        "this URI came from environment (MLFLOW_TRACKING_URI)"], done.stderr
    assert done.stdout.split(None, 1) == ["1", "['mlflow']\n"]  # its client's TLS and credential settings: 2 s
    assert not any((tmp_path / "cache").rglob("*.png")), "the synthetic set was made first"
