"""Manifests of image sets: the digest equals a scanned folder's content hash; tampering is caught."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plantml.datasets import Manifest, S3Location, build_manifest
from plantml.errors import DataError, UsageError
from plantml.training import synth
from plantml.training.data import scan_image_folder


@pytest.fixture(scope="module")
def leaves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("m") / "leaves", synth.SynthSpec(per_class=5, size=16, seed=2))


def test_the_manifest_digest_is_the_scanned_folders_content_hash(leaves: Path) -> None:
    manifest = build_manifest(leaves)
    assert manifest.digest == scan_image_folder(leaves).content_hash
    assert manifest.classes == ("diseased", "healthy") and len(manifest.files) == 10
    assert all(len(e.sha256) == 64 and len(e.md5) == 32 and e.size > 0 for e in manifest.files)


def test_a_manifest_round_trips_through_json(leaves: Path) -> None:
    manifest = build_manifest(leaves)
    assert Manifest.from_json(manifest.to_json(), "x") == manifest


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["files"][0].__setitem__(2, "0" * 64), "does not match its file list"),
    (lambda d: d["files"].pop(), "does not match its file list"),
    (lambda d: d.pop("digest"), "not a plantml data set manifest"),
])
def test_a_tampered_or_broken_manifest_is_refused_naming_it(leaves: Path, edit, message) -> None:
    data = json.loads(build_manifest(leaves).to_json())
    edit(data)
    with pytest.raises(DataError, match=rf"s3://b/x/plantml-dataset.json: .*{message}"):
        Manifest.from_json(json.dumps(data), "s3://b/x/plantml-dataset.json")


def _with_file(data: dict, path: str) -> None:
    data["files"].append([path, 5, hashlib.sha256(b"hello").hexdigest(), hashlib.md5(b"hello").hexdigest()])


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["files"].insert(1, list(d["files"][0])), "'diseased/diseased_0000.png' is listed twice"),
    (lambda d: _with_file(d, "healthy/notes.txt"), "'healthy/notes.txt' is not an image a push lists"),
    (lambda d: _with_file(d, "healthy/.thumbs/x.png"), "'healthy/.thumbs/x.png' is not an image a push lists"),
    (lambda d: _with_file(d, "healthy/./healthy_0000.png"), "is not an image a push lists"),
    (lambda d: d["files"].reverse(), "its files are not in the order a push lists them"),
    (lambda d: d.__setitem__("classes", ["healthy", "diseased"]), "its classes (healthy, diseased) are not its files'"),
])
def test_a_manifest_edited_into_a_file_list_no_push_writes_is_refused_naming_it(leaves: Path, edit, message) -> None:
    """The digest recomputed after the edit: a pull would take it, and each training would then blame the cache."""
    from plantml.datasets import content_digest

    data = json.loads(build_manifest(leaves).to_json())
    edit(data)
    data["digest"] = content_digest((f[0], f[2]) for f in data["files"])
    with pytest.raises(DataError) as refused:
        Manifest.from_json(json.dumps(data), "s3://b/x/plantml-dataset.json")
    assert str(refused.value).startswith("s3://b/x/plantml-dataset.json: ") and message in str(refused.value)


@pytest.mark.parametrize("name", ["", "   ", "x" * 600, "a/b", "nul\0name"])
def test_a_manifest_whose_name_no_folder_has_is_refused_before_any_run_records_it(leaves: Path, name: str) -> None:
    """The name is not in the digest: edited by hand, MLflow would refuse it only once the run exists."""
    data = json.loads(build_manifest(leaves).to_json())
    data["name"] = name
    with pytest.raises(DataError) as refused:
        Manifest.from_json(json.dumps(data), "s3://b/x/plantml-dataset.json")
    assert str(refused.value).startswith(f"s3://b/x/plantml-dataset.json: its name {name[:40]!r} is not a folder's name")


def test_a_manifest_cannot_point_outside_the_set(leaves: Path) -> None:
    from plantml.datasets import content_digest

    data = json.loads(build_manifest(leaves).to_json())
    data["files"][0][0] = "../../etc/passwd"
    data["digest"] = content_digest((f[0], f[2]) for f in data["files"])
    with pytest.raises(DataError, match="is not inside a class folder"):
        Manifest.from_json(json.dumps(data), "m")


def test_a_folder_without_two_classes_is_refused(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    with pytest.raises(DataError, match="need at least two class sub-folders") as refused:
        build_manifest(tmp_path)
    assert str(refused.value).endswith("found 1 (only)")


def test_a_set_one_folder_down_is_named_in_the_refusal(tmp_path: Path) -> None:
    """``PlantVillage/PlantVillage/<classes>`` (how many archives unpack, a Mac's ``__MACOSX`` beside it): the one
    folder found holds the classes; the refusal names it."""
    synth.generate(tmp_path / "download" / "PlantVillage", synth.SynthSpec(per_class=3, size=16, seed=2))
    (tmp_path / "download" / "__MACOSX" / "PlantVillage").mkdir(parents=True)

    with pytest.raises(DataError) as refused:
        scan_image_folder(tmp_path / "download")

    assert str(refused.value) == (f"data folder {tmp_path / 'download'}: need at least two class sub-folders, found 1 "
                                  f"(PlantVillage); PlantVillage holds 2 folders: is the set "
                                  f"{tmp_path / 'download' / 'PlantVillage'}?")


@pytest.mark.parametrize("uri, bucket, prefix", [("s3://data", "data", ""), ("s3://data/a/b/", "data", "a/b")])
def test_s3_locations_split_into_bucket_and_prefix(uri: str, bucket: str, prefix: str) -> None:
    where = S3Location.parse(uri)
    assert (where.bucket, where.prefix) == (bucket, prefix)
    assert where.key("healthy/x.png") == (f"{prefix}/healthy/x.png" if prefix else "healthy/x.png")


@pytest.mark.parametrize("uri", ["data/x", "s3:///x", "http://h/x"])
def test_a_malformed_s3_location_is_a_usage_error(uri: str) -> None:
    with pytest.raises(UsageError, match="expected s3://BUCKET/PREFIX"):
        S3Location.parse(uri)


def test_images_in_hidden_sub_folders_of_a_class_are_ignored(tmp_path: Path) -> None:
    folder = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=3, size=16, seed=2))
    before = build_manifest(folder).digest
    for hidden in (".thumbs", "sub/.Trashes"):
        (folder / "healthy" / hidden).mkdir(parents=True)
        shutil.copy(folder / "healthy" / "healthy_0000.png", folder / "healthy" / hidden / "t.png")

    assert build_manifest(folder).digest == before
    assert len(scan_image_folder(folder).samples) == 6


def test_the_macos_metadata_a_finder_zip_unpacks_to_is_no_class_and_no_image(tmp_path: Path, caplog) -> None:
    """Was: a set unzipped from a Mac's archive (Kaggle's, a colleague's) stopped with ``class folder …/__MACOSX: no
    images``, or with a ``__MACOSX`` in a class, a warning about its ``._`` files; it is the set without them."""
    folder = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=3, size=16, seed=2))
    before = build_manifest(folder).digest
    for metadata in (folder / "__MACOSX" / "healthy", folder / "healthy" / "__MACOSX"):
        metadata.mkdir(parents=True)
        (metadata / "._healthy_0000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble, not a PNG
        shutil.copy(folder / "healthy" / "healthy_0000.png", metadata / "copy.png")

    with caplog.at_level("WARNING"):
        scan = scan_image_folder(folder)

    assert scan.classes == ("diseased", "healthy") and len(scan.samples) == 6 and caplog.messages == []
    assert build_manifest(folder).digest == before


def test_a_file_that_cannot_be_read_is_named_when_a_set_is_hashed_for_a_push(tmp_path: Path) -> None:
    folder = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=3, size=16, seed=2))
    (folder / "healthy" / "locked.png").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO), root included

    with pytest.raises(DataError, match=r"locked.png: cannot be read \(Input/output error\)"):
        build_manifest(folder)


def test_a_sub_folder_that_cannot_be_listed_is_named_not_left_out(tmp_path: Path) -> None:
    folder = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=3, size=16, seed=2))
    locked = folder / "healthy" / "locked"
    locked.mkdir()
    shutil.copy(folder / "healthy" / "healthy_0000.png", locked / "x.png")
    locked.chmod(0)
    # root lists any folder: drop the capabilities that let it (setpriv's bounding set), as another account would be
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "plantml", "data", "inspect", str(folder)],
                              capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o700)

    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"plantml: error: folder {locked}: cannot be read (Permission denied)"



def test_a_set_has_the_same_classes_and_digest_in_a_shell_whose_locale_is_not_utf8(tmp_path: Path, leaves: Path) -> None:
    folder = tmp_path / "plants"
    shutil.copytree(leaves / "healthy", folder / "gesünd")
    shutil.copytree(leaves / "diseased", folder / "kränk")
    here = build_manifest(folder)
    show = ("import json, sys; from plantml.datasets import build_manifest; from plantml.training.data import scan_image_folder; "
            "m, s = build_manifest(sys.argv[1]), scan_image_folder(sys.argv[1]); "
            "print(json.dumps([m.classes, s.classes, m.digest, s.content_hash, m.files[0].path]))")
    # C without UTF-8 mode nor coercion: Python reads file names as ASCII, as a Latin-1 locale reads them as Latin-1
    ascii_shell = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}

    done = subprocess.run([sys.executable, "-c", show, str(folder)], env=ascii_shell, capture_output=True, text=True,
                          encoding="utf-8", check=True)

    classes, scanned, digest, content_hash, first = json.loads(done.stdout)
    assert classes == scanned == ["gesünd", "kränk"] and first == "gesünd/healthy_0000.png"
    assert digest == content_hash == here.digest
