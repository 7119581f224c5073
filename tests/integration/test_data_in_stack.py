"""Image sets kept in the stack's object store, on the session's backend: the design's buckets,
push / ls / pull, training from ``s3://``, the run's dataset input, tampering and resuming.

Everything is read back with boto3 and a plain ``MlflowClient``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from plantml.datasets import build_manifest, list_sets
from plantml.settings import env_value
from plantml.training import synth

DESIGN_BUCKETS = {"models", "plants-images", "data", "mlflow"}
TINY_TRAINING = ["--epochs", "1", "--batch-size", "16", "--image-size", "16", "--weights", "none", "--num-workers", "0",
                 "--no-register"]


def plantml(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plantml", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def leaves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=15, size=32, seed=7))


@pytest.fixture
def env(mlflow_stack: Any, tmp_path: Path) -> dict[str, str]:
    """The stack's client variables and a cache of this test's own."""
    return {**os.environ, **mlflow_stack.client_env(), "PLANTML_CACHE_DIR": str(tmp_path / "cache")}


@pytest.fixture
def prefix() -> str:
    return f"s3://plants-images/test-{uuid.uuid4().hex[:8]}"


def test_the_stack_creates_the_designs_buckets(s3_client: Any) -> None:
    assert env_value("PLANTML_S3_BUCKETS").split(",") == ["mlflow", "models", "plants-images", "data"]
    assert DESIGN_BUCKETS <= {bucket["Name"] for bucket in s3_client.list_buckets()["Buckets"]}


def test_push_ls_train_and_train_again_from_the_cache(leaves: Path, env: dict[str, str], prefix: str, s3_client: Any,
                                                      mlflow_client: Any, experiment_name: str) -> None:
    pushed = plantml(env, "data", "push", str(leaves), prefix)
    assert pushed.returncode == 0, pushed.stderr
    digest = build_manifest(leaves).digest
    assert pushed.stdout.strip().endswith(f"digest {digest}") and "30 uploaded, 0 already there" in pushed.stdout
    bucket, key_prefix = prefix[5:].split("/", 1)
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=key_prefix + "/")["Contents"]}
    assert f"{key_prefix}/plantml-dataset.json" in keys and len(keys) == 31

    listed = plantml(env, "data", "ls", f"s3://{bucket}")
    assert any(line.startswith(f"{prefix}  30 files  2 classes") and line.endswith(digest) for line in listed.stdout.splitlines())

    first = plantml(env, "train", *TINY_TRAINING, "--data-dir", prefix, "--experiment-name", experiment_name)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"data: {prefix} (30 files, " in first.stderr
    # the images leave the bucket (the manifest stays): a second training that still works downloaded none of them
    images = sorted(key for key in keys if not key.endswith("/plantml-dataset.json"))
    s3_client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in images]})
    assert len(s3_client.list_objects_v2(Bucket=bucket, Prefix=key_prefix + "/")["Contents"]) == 1
    second = plantml(env, "train", *TINY_TRAINING, "--data-dir", prefix, "--experiment-name", experiment_name)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"data: {prefix} (cached, nothing downloaded)" in second.stderr

    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    runs = mlflow_client.search_runs([experiment.experiment_id], filter_string=f"dataset.digest = '{digest[:32]}'")
    assert len(runs) == 2 and {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:
        [dataset_input] = run.inputs.dataset_inputs
        dataset = dataset_input.dataset
        assert (dataset.name, dataset.digest, dataset.source_type) == ("leaves", digest[:32], "s3")
        assert f'"content_sha256": "{digest}"' in dataset.profile
        assert prefix in dataset.source and run.data.tags["dataset_source"] == prefix  # the run's own source
        profile = json.loads(dataset.profile)
        assert profile["classes"] == ["diseased", "healthy"]
        assert profile["train_size"] + profile["val_size"] + profile["test_size"] == 30 and profile["train_size"] > 20
        assert {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"] == "training"


@pytest.mark.local_session  # the client's: the containers session would only repeat it, slower
def test_a_local_folder_is_recorded_too(leaves: Path, env: dict[str, str], mlflow_client: Any, experiment_name: str) -> None:
    """(The synthetic set: test_train_tracked.py's default command.)"""
    done = plantml(env, "train", *TINY_TRAINING, "--data-dir", str(leaves), "--experiment-name", experiment_name)
    assert done.returncode == 0, done.stderr[-2000:]
    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    [run] = mlflow_client.search_runs([experiment.experiment_id])
    [dataset_input] = run.inputs.dataset_inputs
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == ("leaves", build_manifest(leaves).digest[:32])
    assert dataset_input.dataset.source_type == "local" and str(leaves) in dataset_input.dataset.source
    assert run.data.tags["dataset_source"] == str(leaves)


@pytest.mark.local_session  # the client's: the containers session would only repeat it, slower
def test_a_tampered_object_is_refused_by_name_before_any_run(leaves: Path, env: dict[str, str], prefix: str,
                                                              s3_client: Any, mlflow_client: Any, experiment_name: str) -> None:
    assert plantml(env, "data", "push", str(leaves), prefix).returncode == 0
    bucket, key_prefix = prefix[5:].split("/", 1)
    victim = sorted((leaves / "healthy").iterdir())[3].name
    s3_client.put_object(Bucket=bucket, Key=f"{key_prefix}/healthy/{victim}", Body=b"not the image that was pushed")

    done = plantml(env, "train", *TINY_TRAINING, "--data-dir", prefix, "--experiment-name", experiment_name)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"plantml: error: {prefix}/healthy/{victim}: content does not match the manifest (corrupt or tampered); nothing was kept"]
    assert mlflow_client.get_experiment_by_name(experiment_name) is None
    assert not list((Path(env["PLANTML_CACHE_DIR"]) / "datasets").iterdir())

    s3_client.delete_object(Bucket=bucket, Key=f"{key_prefix}/healthy/{victim}")
    missing = plantml(env, "train", *TINY_TRAINING, "--data-dir", prefix, "--experiment-name", experiment_name)
    assert missing.returncode == 2
    assert f"{prefix}/healthy/{victim}: missing from the data set" in missing.stderr


def test_an_interrupted_push_resumes(env: dict[str, str], prefix: str, s3_client: Any, tmp_path: Path) -> None:
    big = synth.generate(tmp_path / "big", synth.SynthSpec(per_class=150, size=96, seed=8))
    bucket, key_prefix = prefix[5:].split("/", 1)

    def stored() -> set[str]:
        pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix + "/")
        return {o["Key"] for page in pages for o in page.get("Contents", [])}

    push = subprocess.Popen([sys.executable, "-m", "plantml", "data", "push", "--workers", "1", str(big), prefix], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(stored()) < 20 and push.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(push.pid, signal.SIGKILL)
    push.wait()
    time.sleep(1)  # a request whose body had fully arrived may still be committed by the server
    before = stored()
    assert 20 <= len(before) < 300 and f"{key_prefix}/plantml-dataset.json" not in before, "the push was not interrupted"

    resumed = plantml(env, "data", "push", str(big), prefix)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{300 - len(before)} uploaded, {len(before)} already there" in resumed.stdout
    assert len(stored()) == 301
    shutil.rmtree(big)


@pytest.mark.local_session
def test_a_file_sent_in_parts_and_changed_at_the_same_size_is_sent_again(mlflow_stack: Any, prefix: str,
                                                                         tmp_path: Path, monkeypatch) -> None:
    """A file over the single-part limit has no MD5 ETag: a second push compares its SHA-256, not only its size."""
    from plantml.datasets import remote

    monkeypatch.setattr(remote, "SINGLE_PART_LIMIT", 64)  # every image goes the multipart way
    folder = synth.generate(tmp_path / "parts", synth.SynthSpec(per_class=3, size=32, seed=9))
    client = mlflow_stack.s3_client()
    first = remote.push(client, folder, prefix)
    assert (first.uploaded, first.skipped) == (6, 0)
    assert (remote.push(client, folder, prefix).uploaded) == 0  # unchanged: nothing sent

    changed = sorted(folder.rglob("*.png"))[0]
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    changed.write_bytes(bytes(data))
    again = remote.push(client, folder, prefix)

    assert (again.uploaded, again.skipped) == (1, 5)
    key = remote.S3Location.parse(prefix).key(changed.relative_to(folder).as_posix())
    stored = client.get_object(Bucket=remote.S3Location.parse(prefix).bucket, Key=key)["Body"].read()
    assert stored == bytes(data)


@pytest.mark.local_session
@pytest.mark.parametrize("change", ["saved again", "removed"])
def test_an_image_saved_again_or_removed_after_it_was_hashed_is_one_line_naming_it_and_not_kept(
        mlflow_stack: Any, prefix: str, tmp_path: Path, monkeypatch, change: str) -> None:
    """A file under the single-part limit goes up with the Content-MD5 of its hashing: the real store refuses
    other bytes (BadDigest), which is the user's file changing under the push, not the store failing."""
    from plantml.datasets import remote
    from plantml.errors import DataError

    folder = synth.generate(tmp_path / "set", synth.SynthSpec(per_class=3, size=32, seed=10))
    victim = sorted(folder.rglob("*.png"))[0]

    def hash_then_change(*args: Any, **kwargs: Any) -> Any:
        manifest = build_manifest(*args, **kwargs)
        if change == "removed":
            victim.unlink()
        else:
            victim.write_bytes(victim.read_bytes() + b"saved again")
        return manifest

    monkeypatch.setattr(remote, "build_manifest", hash_then_change)
    client = mlflow_stack.s3_client()
    with pytest.raises(DataError) as refused:
        remote.push(client, folder, prefix, workers=1)
    assert str(refused.value) == (f"image {victim}: changed or removed while it was pushed; nothing of it was kept, "
                                  "push again")
    where = remote.S3Location.parse(prefix)
    kept = {o["Key"] for o in client.list_objects_v2(Bucket=where.bucket, Prefix=f"{where.prefix}/").get("Contents", [])}
    assert where.key(victim.relative_to(folder).as_posix()) not in kept and where.key("plantml-dataset.json") not in kept


@pytest.mark.local_session
def test_data_synth_writes_the_synthetic_set_straight_to_the_store(env: dict[str, str], prefix: str, tmp_path: Path) -> None:
    made = plantml(env, "data", "synth", prefix, "--per-class", "4", "--size", "16", "--seed", "3")
    assert made.returncode == 0, made.stderr
    local = synth.generate(tmp_path / "same", synth.SynthSpec(per_class=4, size=16, seed=3))
    listed = plantml(env, "data", "ls", prefix)
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    assert line.startswith(f"{prefix}  8 files  2 classes ({', '.join(synth.CLASSES)})")
    assert line.endswith(f"digest {build_manifest(local).digest}")  # the same images as a local synth of that spec


def test_ls_lists_the_good_sets_and_warns_once_per_broken_manifest(leaves: Path, mlflow_env: Any, s3_client: Any,
                                                                    prefix: str, tmp_path: Path, monkeypatch, capsys) -> None:
    from plantml.cli import main
    from plantml.datasets import remote

    monkeypatch.chdir(tmp_path)  # no .env: the stack's variables only
    remote.push(mlflow_env.s3_client(), leaves, f"{prefix}/good")
    bucket, key_prefix = prefix[5:].split("/", 1)
    s3_client.put_object(Bucket=bucket, Key=f"{key_prefix}/broken/plantml-dataset.json", Body=b"{not json")

    code = main(["data", "ls", prefix])
    out, err = capsys.readouterr()

    assert code == 1
    assert [line.split("  ")[0] for line in out.splitlines()] == [f"{prefix}/good"]
    [warning] = err.splitlines()
    assert warning.startswith(f"plantml: warning: {prefix}/broken/plantml-dataset.json: not a plantml data set manifest")


@pytest.mark.local_session  # the walk is the client's
def test_ls_lists_the_folders_but_not_the_images_of_a_set(leaves: Path, mlflow_env: Any, prefix: str) -> None:
    """`data ls` listed every object under its location to find the manifests: 4-6 s per 20,000 images
    stored (8.8 s for a bucket of one such set, 0.7 s walking its folders instead)."""
    from plantml.datasets import MANIFEST_NAME, remote

    client = mlflow_env.s3_client()
    remote.push(client, leaves, f"{prefix}/a/set")
    listed: list[str] = []
    client.meta.events.register("after-call.s3.ListObjectsV2",
                                lambda parsed, **_: listed.extend(item["Key"] for item in parsed.get("Contents", [])))
    found = list_sets(client, prefix)
    assert [(str(location), len(manifest.files)) for location, manifest in found.sets] == [(f"{prefix}/a/set", 30)]
    assert [key.rpartition("/")[2] for key in listed] == [MANIFEST_NAME]


def test_a_missing_bucket_is_a_usage_error_for_ls_and_push(leaves: Path, mlflow_env: Any, tmp_path: Path,
                                                          monkeypatch, capsys) -> None:
    from plantml.cli import main

    monkeypatch.chdir(tmp_path)
    for args in (["data", "ls", "s3://no-such-bucket-plantml"], ["data", "push", str(leaves), "s3://no-such-bucket-plantml/x"]):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"plantml: error: {args[-1]}: no bucket 'no-such-bucket-plantml'") and len(err.splitlines()) == 1


@pytest.mark.local_session  # the cache and its locks are the client's: containers would only repeat it
def test_a_training_s_cached_set_outlives_a_clean_up_and_goes_at_the_next_once_unused(
        leaves: Path, env: dict[str, str], prefix: str, experiment_name: str) -> None:
    assert plantml(env, "data", "push", str(leaves), prefix).returncode == 0
    training = subprocess.Popen([sys.executable, "-m", "plantml", "train", *TINY_TRAINING, "--epochs", "500",
                                 "--early-stopping-patience", "500", "--data-dir", prefix, "--experiment-name", experiment_name],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert training.stdout.readline().startswith("epoch 1/"), training.stderr.read() if training.poll() is not None else ""
        cleaned = plantml(env, "data", "cache", "--remove-unused-for", "0s")
        assert cleaned.returncode == 0 and cleaned.stdout.splitlines() == ["removed 0 set(s), 0.0 MB"], cleaned.stdout
        listed = plantml(env, "data", "cache")
        assert listed.stdout.splitlines()[0].endswith("in use") and "30 files" in listed.stdout
    finally:
        training.send_signal(signal.SIGTERM)
        training.communicate(timeout=120)
    cached = Path(env["PLANTML_CACHE_DIR"]) / "datasets" / build_manifest(leaves).digest
    assert cached.is_dir()
    cleaned = plantml(env, "data", "cache", "--remove-unused-for", "0s")
    assert cleaned.returncode == 0 and cleaned.stdout.splitlines()[-1].startswith("removed 1 set(s), ")
    assert not cached.exists() and os.listdir(cached.parent) == []
