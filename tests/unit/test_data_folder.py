"""Image-folder checks, the stratified split and the loaders."""

from __future__ import annotations

import shutil

import pytest
import torch

from plantml.errors import DataError
from plantml.training import synth
from plantml.training.data import build_loaders, default_num_workers, scan_image_folder, stratified_split


@pytest.fixture
def folder(tmp_path):
    return synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=10, size=24, seed=0))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        scan_image_folder(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_fewer_than_two_classes_is_refused(folder):
    shutil.rmtree(folder / "healthy")
    with pytest.raises(DataError, match="at least two class"):
        scan_image_folder(folder)


def test_an_empty_class_is_named(folder):
    (folder / "rust").mkdir()
    with pytest.raises(DataError, match="rust.*no images"):
        scan_image_folder(folder)


def test_an_unreadable_image_is_named(folder):
    bad = folder / "healthy" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        scan_image_folder(folder)


def test_skip_bad_images_leaves_them_out_and_counts_them(folder):
    (folder / "healthy" / "broken.png").write_bytes(b"not a png")
    (folder / "diseased" / "cut.jpg").write_bytes(b"\xff\xd8\xff")

    scan = scan_image_folder(folder, skip_bad_images=True)

    assert len(scan.skipped) == 2
    assert scan.class_counts() == {"diseased": 10, "healthy": 10}


def test_content_hash_changes_with_one_file(folder):
    before = scan_image_folder(folder).content_hash
    shutil.copy(folder / "healthy" / "healthy_0000.png", folder / "healthy" / "extra.png")

    assert scan_image_folder(folder).content_hash != before


def test_design_set_splits_280_60_60():
    labels = [0] * 200 + [1] * 200

    split = stratified_split(labels, seed=3)

    assert split.sizes() == {"train_size": 280, "val_size": 60, "test_size": 60}
    for subset, per_class in ((split.train, 140), (split.val, 30), (split.test, 30)):
        assert sum(labels[i] for i in subset) == per_class  # stratified: half of each subset is class 1


def test_split_is_a_seeded_partition():
    labels = [0] * 30 + [1] * 50
    split = stratified_split(labels, seed=5)

    everything = split.train + split.val + split.test
    assert sorted(everything) == list(range(80))
    assert stratified_split(labels, seed=5) == split
    assert stratified_split(labels, seed=6) != split


def test_too_few_images_for_the_split_is_refused():
    with pytest.raises(DataError, match="too few"):
        stratified_split([0, 0, 1, 1, 1], class_names=["a", "b"])


def test_train_loader_augments_and_eval_loaders_do_not(folder):
    scan = scan_image_folder(folder)
    split = stratified_split([label for _, label in scan.samples], seed=0)
    loaders = build_loaders(scan, split, image_size=16, batch_size=4, num_workers=0, seed=0)

    images, labels = next(iter(loaders.val))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert abs(float(images.mean())) < 3  # normalised, not 0..255
    first = torch.stack([loaders.val.dataset[0][0], loaders.val.dataset[0][0]])
    assert torch.equal(first[0], first[1])
    assert "RandomHorizontalFlip" in repr(loaders.train.dataset.transform)
    assert "Random" not in repr(loaders.val.dataset.transform)


def test_workers_are_sized_to_the_machine():
    assert 0 <= default_num_workers() <= 8


def test_inspect_refuses_a_class_too_small_to_split_as_train_does(folder, capsys):
    """``data inspect`` checks a folder before training: a class train refuses is not a table saying all is well."""
    from plantml.cli import main

    for extra in sorted((folder / "healthy").iterdir())[2:]:
        extra.unlink()
    expected = "plantml: error: class 'healthy': 2 image(s) are too few for a train/val/test split (need at least 3)"

    assert main(["data", "inspect", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == expected
    assert main(["train", "--data-dir", str(folder), "--no-mlflow", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.parametrize("command", ["data inspect", "train", "data push"])
def test_two_class_folders_recorded_under_one_name_are_refused_in_one_line_naming_both(folder, monkeypatch, capsys,
                                                                                       command):
    """A Latin-1 folder ``healthy\\xff`` is recorded as class ``healthy%FF`` (a byte that is not UTF-8 is written %XX),
    as is a folder really named ``healthy%FF``: the set trained, and its model had two output columns of one name."""
    import os

    from plantml.cli import main

    for name in (b"healthy\xff", b"healthy%FF"):
        shutil.copytree(folder / "healthy", folder / os.fsdecode(name))
    argv = {"data inspect": ["data", "inspect", str(folder)],
            "train": ["train", "--data-dir", str(folder), "--no-mlflow", "--epochs", "1"],
            "data push": ["data", "push", str(folder), "s3://plantml-data/leaves"]}[command]
    for name, value in {"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "plantml-key",
                        "AWS_SECRET_ACCESS_KEY": "plantml-secret"}.items():  # a store never reached: refused before
        monkeypatch.setenv(name, value)

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"plantml: error: data folder {folder}: class folders b'healthy%FF' and b'healthy\\xff' would both be "
                   "recorded as class 'healthy%FF' (a byte that is not UTF-8 is written %XX); rename one\n")


@pytest.mark.parametrize("splits", [("train", "val"), ("Train", "Valid", "Test")])
def test_a_set_split_already_is_refused_in_one_line_naming_its_splits_and_classes(folder, tmp_path, capsys, splits):
    """Kaggle's layout, train/healthy, val/healthy: taken as it is, the classes were the splits (every image of
    train/ one class), and the model learned which split a photo came from, with no word said."""
    from plantml.cli import main

    split = tmp_path / "kaggle"
    for name in splits:
        shutil.copytree(folder, split / name)
    shown = ", ".join(sorted(splits))
    expected = (f"data folder {split}: {shown} hold the same class folders (diseased, healthy): a set split already, "
                f"whose classes would be {shown}; give one split (--data-dir {split / sorted(splits)[0]}), or merge them "
                "into one folder per class: plantml splits each class itself (--val-split, --test-split)")

    with pytest.raises(DataError) as refused:
        scan_image_folder(split)
    assert str(refused.value) == expected
    assert main(["data", "inspect", str(split)]) == 2
    assert capsys.readouterr().err == f"plantml: error: {expected}\n"
    assert scan_image_folder(split / sorted(splits)[0]).classes == ("diseased", "healthy")  # one split trains as it is


def test_class_folders_with_sub_folders_of_the_same_names_are_a_set(folder):
    """healthy/field and diseased/field (photos sorted by where they were taken) are classes, not splits."""
    for name in ("healthy", "diseased"):
        (folder / name / "field").mkdir()
        for image in sorted((folder / name).glob("*.png"))[:3]:
            image.rename(folder / name / "field" / image.name)
    scan = scan_image_folder(folder)
    assert scan.classes == ("diseased", "healthy") and len(scan.samples) == 20
