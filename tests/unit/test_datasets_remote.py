"""Pushed sets without a server: S3 locations, names S3 cannot keep, pulls into the cache (a fake
client), staging folders of dead processes, a cached copy held to its manifest, the object
store's settings."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from plantml.datasets import MANIFEST_NAME, S3Location, build_manifest, list_sets, remote
from plantml.datasets.source import DataSource
from plantml.errors import ConfigError, DataError, StorageError, TrackingError, UsageError
from plantml.processes import process_start_time
from plantml.settings import TrackingSettings, resolve_tracking_settings
from plantml.training import synth
from plantml.training.data import scan_image_folder


@pytest.fixture
def leaves(tmp_path: Path) -> Path:
    return synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=4, size=16, seed=4))


class FakeBody:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self) -> bytes:
        return self.data

    def iter_chunks(self, size: int) -> Any:
        yield from (self.data[i:i + size] for i in range(0, len(self.data), size))


class FakeStore:
    """The calls :func:`remote.pull` makes, answered from a local set as if pushed to s3://b/set."""

    def __init__(self, folder: Path) -> None:
        manifest = build_manifest(folder)
        self.objects = {f"set/{e.path}": (folder / e.path).read_bytes() for e in manifest.files}
        self.objects[f"set/{MANIFEST_NAME}"] = manifest.to_json().encode()

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
        return {"Body": FakeBody(self.objects[Key])}


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def staging_of(parent: Path, pid: int, started: str | None) -> Path:
    folder = parent / f".someset.staging-{pid}-{started or 12345}-abc123de"
    (folder / "healthy").mkdir(parents=True)
    (folder / "healthy" / "half.png").write_bytes(b"half")
    return folder


@pytest.mark.parametrize("uri, shown", [
    ("s3://data/x/../y", "'..'"), ("s3://data/t/./dot", "'.'"), ("s3://data/d//e", "an empty path segment"),
    ("s3://data//e", "an empty path segment"), ("s3://data/back\\slash", "a backslash"),
])
def test_an_s3_location_with_dot_empty_or_backslash_segments_is_a_usage_error(uri: str, shown: str) -> None:
    with pytest.raises(UsageError) as refused:
        S3Location.parse(uri)
    assert str(refused.value).startswith(f"{uri!r}: ") and shown in str(refused.value)


@pytest.mark.parametrize("command", [["data", "ls"], ["data", "push", "{leaves}"], ["data", "synth"], ["train", "--data-dir"]])
def test_an_s3_location_typed_in_a_latin1_shell_is_one_line_exit_2(leaves: Path, monkeypatch, capsys, command) -> None:
    """Was a traceback ending in boto3's UnicodeEncodeError ('utf-8' codec can't encode character '\\udcff')."""
    from plantml.cli import main

    for name, value in {"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "plantml-key",
                        "AWS_SECRET_ACCESS_KEY": "plantml-secret"}.items():
        monkeypatch.setenv(name, value)

    code = main([part.format(leaves=leaves) for part in command] + ["s3://data/x\udcffy"])

    assert code == 2
    assert capsys.readouterr().err == ("plantml: error: 's3://data/x%FFy': holds bytes that are not UTF-8 (shown as %XX); "
                                       "give it in UTF-8\n")


def test_a_bad_location_is_refused_before_any_file_is_hashed(leaves: Path, monkeypatch) -> None:
    monkeypatch.setattr(remote, "build_manifest", lambda *a, **k: pytest.fail("hashed before the location was checked"))
    with pytest.raises(UsageError):
        remote.push(None, leaves, "s3://data/x/../y")


def test_push_refuses_a_name_with_a_backslash_naming_it(leaves: Path) -> None:
    (leaves / "back\\slash").mkdir()
    (leaves / "healthy" / "healthy_0000.png").rename(leaves / "back\\slash" / "a.png")
    with pytest.raises(DataError, match=r"back\\\\slash.*holds a backslash"):
        remote.push(None, leaves, "s3://data/x")  # refused before the store is asked anything


def test_a_file_sent_in_parts_that_changes_during_the_push_is_one_line_naming_it(leaves: Path, monkeypatch) -> None:
    from botocore.exceptions import ClientError

    class Store:
        def get_paginator(self, name: str) -> Any:
            return type("Pages", (), {"paginate": lambda self, **kw: [{"Contents": []}]})()

        def upload_fileobj(self, body: Any, bucket: str, key: str, ExtraArgs: Any) -> None:  # noqa: N803 - boto3's names
            raise ClientError({"Error": {"Code": "BadDigest", "Message": "The Content-Md5 you specified did not match"}},
                              "UploadPart")

    monkeypatch.setattr(remote, "SINGLE_PART_LIMIT", 0)  # every file goes up in parts
    with pytest.raises(TrackingError) as failed:
        remote.push(Store(), leaves, "s3://data/set", workers=1)
    assert "s3://data/set: upload of diseased/" in str(failed.value) and "BadDigest" in str(failed.value)


def test_a_file_sent_in_parts_saved_again_after_it_was_hashed_is_not_kept(leaves: Path, monkeypatch) -> None:
    stored: dict[str, bytes] = {}

    class Store:
        def get_paginator(self, name: str) -> Any:
            return type("Pages", (), {"paginate": lambda self, **kw: [{"Contents": []}]})()

        def upload_fileobj(self, body: Any, bucket: str, key: str, ExtraArgs: Any) -> None:  # noqa: N803 - boto3's names
            stored[key] = b"".join(iter(lambda: body.read(3), b""))

        def upload_file(self, filename: str, bucket: str, key: str, ExtraArgs: Any) -> None:  # noqa: N803
            stored[key] = Path(filename).read_bytes()

        def delete_object(self, Bucket: str, Key: str) -> None:  # noqa: N803
            del stored[Key]

        def put_object(self, **kwargs: Any) -> None:
            stored[kwargs["Key"]] = b"manifest"

    changed = sorted(leaves.glob("healthy/*.png"))[0]

    def hash_then_save_again(*args: Any, **kwargs: Any) -> Any:
        manifest = build_manifest(*args, **kwargs)
        changed.write_bytes(changed.read_bytes()[::-1])  # same size, other bytes: the user saved it again
        return manifest

    monkeypatch.setattr(remote, "SINGLE_PART_LIMIT", 0)  # every file goes up in parts
    monkeypatch.setattr(remote, "build_manifest", hash_then_save_again)
    with pytest.raises(DataError, match=f"image {changed}: changed or removed while it was pushed"):
        remote.push(Store(), leaves, "s3://data/set", workers=1)
    assert f"set/healthy/{changed.name}" not in stored and f"set/{MANIFEST_NAME}" not in stored


class CutStore:
    """A bucket in memory whose ``put_object`` fails once ``puts_left`` calls were answered (the store went away mid-push)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts_left: int | None = None

    def get_paginator(self, name: str) -> Any:
        listed = [{"Key": key, "Size": len(data), "ETag": hashlib.md5(data).hexdigest()} for key, data in self.objects.items()]
        return type("Pages", (), {"paginate": lambda self, **kw: [{"Contents": listed}]})()

    def put_object(self, Key: str, Body: Any, **kwargs: Any) -> None:  # noqa: N803 - boto3's names
        from botocore.exceptions import EndpointConnectionError

        if self.puts_left is not None:
            if self.puts_left == 0:
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
            self.puts_left -= 1
        self.objects[Key] = Body if isinstance(Body, bytes) else Body.read()

    def delete_object(self, Bucket: str, Key: str) -> None:  # noqa: N803
        self.objects.pop(Key, None)

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        from botocore.exceptions import ClientError

        if Key not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": "not found"}}, "GetObject")
        return {"Body": FakeBody(self.objects[Key])}


def test_a_push_of_other_files_cut_midway_leaves_no_manifest_they_no_longer_match(leaves: Path, tmp_path: Path) -> None:
    store = CutStore()
    remote.push(store, leaves, "s3://data/set", workers=1)
    other = synth.generate(tmp_path / "other", synth.SynthSpec(per_class=4, size=16, seed=5))
    store.puts_left = 3  # three of the eight files replaced, then the store is gone

    with pytest.raises(TrackingError, match="upload of"):
        remote.push(store, other, "s3://data/set", workers=1)

    assert list_sets(store, "s3://data").sets == []
    with pytest.raises(DataError, match=f"s3://data/set: no data set there .*{MANIFEST_NAME} not found"):
        remote.read_manifest(store, S3Location.parse("s3://data/set"))


def test_a_push_whose_files_another_push_replaced_meanwhile_says_so_and_leaves_no_set(leaves: Path) -> None:
    """Two pushes of other sets to one location at once: one's file lands between the other's uploads and its manifest."""

    class RacedStore(CutStore):
        def put_object(self, Key: str, Body: Any, **kwargs: Any) -> None:  # noqa: N803 - boto3's names
            if Key == f"set/{MANIFEST_NAME}":
                super().put_object(Key="set/healthy/healthy_0001.png", Body=b"the other push's image")
            super().put_object(Key=Key, Body=Body, **kwargs)

    store = RacedStore()
    with pytest.raises(DataError) as refused:
        remote.push(store, leaves, "s3://data/set", workers=1)

    assert str(refused.value).startswith("s3://data/set: healthy/healthy_0001.png is not the file this push sent")
    assert f"set/{MANIFEST_NAME}" not in store.objects and list_sets(store, "s3://data").sets == []


def test_a_push_that_finds_another_pushs_manifest_in_place_of_its_own_leaves_that_one(leaves: Path) -> None:
    """Its files were replaced and its manifest too: that set is the other push's to check, not this one's to delete."""

    class RacedStore(CutStore):
        def put_object(self, Key: str, Body: Any, **kwargs: Any) -> None:  # noqa: N803 - boto3's names
            super().put_object(Key=Key, Body=Body, **kwargs)
            if Key == f"set/{MANIFEST_NAME}":  # the other push ends right after this one wrote its manifest
                super().put_object(Key="set/healthy/healthy_0001.png", Body=b"the other push's image")
                super().put_object(Key=Key, Body=b'{"the other push": "manifest"}')

    store = RacedStore()
    with pytest.raises(DataError, match=f"^s3://data/set: {MANIFEST_NAME} is not the one this push wrote"):
        remote.push(store, leaves, "s3://data/set", workers=1)

    assert store.objects[f"set/{MANIFEST_NAME}"] == b'{"the other push": "manifest"}'


def test_pull_removes_the_staging_folder_of_a_dead_process_and_keeps_a_live_ones(leaves: Path, tmp_path: Path) -> None:
    datasets = tmp_path / "cache" / "datasets"
    datasets.mkdir(parents=True)
    pid = dead_pid()
    dead = staging_of(datasets, pid, "1")
    live = staging_of(datasets, os.getpid(), process_start_time(os.getpid()))
    reused = staging_of(datasets, os.getpid(), "1")  # our pid, another start time: a pid reused since

    pulled = remote.pull(FakeStore(leaves), "s3://b/set", tmp_path / "cache")

    assert pulled.downloaded == 8 and (pulled.folder / MANIFEST_NAME).is_file()
    assert not dead.exists() and not reused.exists()
    assert live.is_dir()
    assert sorted(p.name for p in datasets.iterdir()) == sorted([live.name, pulled.folder.name])


def test_ensure_cached_removes_the_staging_folder_of_a_dead_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path))
    dead = staging_of(tmp_path, dead_pid(), "1")
    live = staging_of(tmp_path, os.getpid(), process_start_time(os.getpid()))

    synth.ensure_cached(synth.SynthSpec(per_class=3, size=16, seed=5))

    assert not dead.exists() and live.is_dir()


def test_a_cache_folder_that_cannot_be_written_is_one_line_naming_it(leaves: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match=rf"^cache folder \(PLANTML_CACHE_DIR\) {blocker / 'cache'}: not a directory$"):
        remote.pull(FakeStore(leaves), "s3://b/set", blocker / "cache")


def test_a_full_disk_during_a_pull_is_one_line_and_keeps_nothing(leaves: Path, tmp_path: Path, monkeypatch) -> None:
    import errno

    store = FakeStore(leaves)
    written = []

    class FullDisk(FakeBody):
        def iter_chunks(self, size: int) -> Any:
            if len(written) > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(1)
            yield self.data

    monkeypatch.setattr(store, "get_object", lambda Bucket, Key: {"Body": FullDisk(store.objects[Key])})
    with pytest.raises(StorageError, match=rf"^cache folder \(PLANTML_CACHE_DIR\) {tmp_path / 'cache'}: no space left on device$"):
        remote.pull(store, "s3://b/set", tmp_path / "cache", workers=1)
    assert not list((tmp_path / "cache" / "datasets").iterdir())


def pulled_source(folder: Path) -> DataSource:
    manifest = build_manifest(folder)
    return DataSource(folder, folder.name, "s3://b/set", "s3", manifest.digest, manifest=manifest)


def test_skipping_bad_images_does_not_switch_off_the_check_against_the_manifest(leaves: Path) -> None:
    source = pulled_source(leaves)
    (leaves / "healthy" / "healthy_0000.png").write_bytes((leaves / "diseased" / "diseased_0000.png").read_bytes())
    (leaves / "healthy" / "zz.png").write_text("junk")  # one undecodable file, so that --skip-bad-images skips one
    scan = scan_image_folder(leaves, skip_bad_images=True)
    assert len(scan.skipped) == 1

    with pytest.raises(DataError, match=r"changed since it was pulled \(healthy/healthy_0000.png differs from the manifest\)"):
        source.check_digest(scan.content_hash, len(scan.skipped))


def test_a_skipped_image_that_was_pushed_so_passes_the_check(leaves: Path) -> None:
    (leaves / "healthy" / "zz.png").write_text("junk")  # pushed as it is: the manifest lists it
    source = pulled_source(leaves)
    scan = scan_image_folder(leaves, skip_bad_images=True)

    source.check_digest(scan.content_hash, len(scan.skipped))
    assert source.origin_of(leaves / "healthy" / "zz.png") == "s3://b/set/healthy/zz.png"


def test_an_s3_endpoint_without_a_scheme_is_one_line_naming_where_it_came_from(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    (tmp_path / ".env").write_text("MLFLOW_S3_ENDPOINT_URL=127.0.0.1:9\n")
    with pytest.raises(ConfigError, match=rf"^S3 endpoint '127.0.0.1:9' \(from MLFLOW_S3_ENDPOINT_URL in .env in {tmp_path}\)"):
        resolve_tracking_settings()


def test_no_endpoint_and_no_keys_says_which_variables_are_unset(tmp_path: Path, monkeypatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are unset"):
        remote.object_store_client(TrackingSettings())


def test_a_missing_bucket_is_a_usage_error() -> None:
    from botocore.exceptions import ClientError

    class NoBucket:
        def get_paginator(self, name: str) -> Any:
            raise ClientError({"Error": {"Code": "NoSuchBucket", "Message": "no"}}, "ListObjectsV2")

    with pytest.raises(UsageError, match="^s3://nosuch/x: no bucket 'nosuch'"):
        remote.stored_objects(NoBucket(), S3Location.parse("s3://nosuch/x"))


def test_a_set_with_an_image_that_cannot_be_decoded_is_refused_before_the_push(leaves: Path, monkeypatch, capsys) -> None:
    """Was: uploaded (exit 0), then every training from the pushed set failed on that image."""
    from plantml.cli import main

    monkeypatch.chdir(leaves.parent)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # never asked: nothing answers there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "plantml")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-used")
    monkeypatch.setattr(remote, "push", lambda *a, **k: pytest.fail("pushed a set that cannot train"))
    (leaves / "healthy" / "fake.png").write_text("not a png")

    assert main(["data", "push", str(leaves), "s3://data/leaves"]) == 2

    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"plantml: error: image {leaves / 'healthy' / 'fake.png'}: cannot be decoded (not an image format Pillow reads); "
        "a pushed set must train: repair or remove it, then push again")


def test_an_image_name_that_is_not_utf8_is_refused_shown_with_percent_escapes(leaves: Path) -> None:
    """Was shown as Python's surrogate escape (``f\\udce9rn.png``); everywhere else plantml writes ``%E9``."""
    latin1 = Path(os.fsdecode(bytes(leaves / "healthy") + b"/f\xe9rn.png"))
    (leaves / "healthy" / "healthy_0000.png").rename(latin1)
    with pytest.raises(DataError, match=r"healthy/f%E9rn\.png: its name is not valid UTF-8 \(shown as %XX\)"):
        remote.push(None, leaves, "s3://data/x")  # refused before the store is asked anything


def test_a_set_in_a_bucket_that_is_not_there_says_the_bucket_is_missing() -> None:
    """Was: "no data set there … push one with `plantml data push`", when a push there fails for want of the bucket."""
    from botocore.exceptions import ClientError

    class NoBucket:
        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
            raise ClientError({"Error": {"Code": "NoSuchBucket", "Message": "The specified bucket does not exist"}}, "GetObject")

    with pytest.raises(DataError, match=r"^s3://nobucket/x: no bucket 'nobucket' in the object store, so no data set there$"):
        remote.read_manifest(NoBucket(), S3Location.parse("s3://nobucket/x"))
