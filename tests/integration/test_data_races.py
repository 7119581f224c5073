"""A pushed set on the real object store, when a push is cut or another push writes the same location.

The unit tests show the rules with a stand-in store (``tests/unit/test_datasets_remote.py``);
here a real ``plantml data push`` is killed with SIGKILL, or raced by another, on the
session's backend, and what the location holds afterwards is read back with boto3 and
``plantml data ls`` / ``train``: either one whole set whose files match its manifest, or no set.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from plantml.datasets import build_manifest
from plantml.training import synth

MANIFEST = "plantml-dataset.json"


def plantml(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plantml", *args], env=env, capture_output=True, text=True, timeout=300)


def start_push(env: dict[str, str], folder: Path, location: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "plantml", "data", "push", "--workers", "1", str(folder), location],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture
def env(mlflow_stack: Any, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **mlflow_stack.client_env(), "PLANTML_CACHE_DIR": str(tmp_path / "cache")}


@pytest.fixture
def location() -> str:
    return f"s3://plants-images/race-{uuid.uuid4().hex[:8]}"


def stored(s3_client: Any, location: str) -> dict[str, bytes]:
    """Every object under ``location``, by its name in the set, with its bytes."""
    bucket, prefix = location[5:].split("/", 1)
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {key[len(prefix) + 1:]: s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def count(s3_client: Any, location: str) -> int:
    bucket, prefix = location[5:].split("/", 1)
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return sum(len(page.get("Contents", [])) for page in pages)


def assert_one_whole_set_or_none(objects: dict[str, bytes]) -> str | None:
    """The digest of the set the location holds, after checking each listed file's bytes; None without a manifest."""
    if MANIFEST not in objects:
        return None
    manifest = json.loads(objects[MANIFEST])
    for path, size, sha256, _md5 in manifest["files"]:
        assert (len(objects[path]), hashlib.sha256(objects[path]).hexdigest()) == (size, sha256), path
    return manifest["digest"]


@pytest.mark.local_session  # the client's: the containers session would only repeat it, slower
def test_a_push_of_another_set_killed_midway_leaves_no_set_and_training_says_so(env, location, s3_client, tmp_path):
    first = synth.generate(tmp_path / "first", synth.SynthSpec(per_class=15, size=32, seed=7))
    assert plantml(env, "data", "push", str(first), location).returncode == 0
    second = synth.generate(tmp_path / "second", synth.SynthSpec(per_class=150, size=64, seed=9))  # same names, other bytes

    push = start_push(env, second, location)
    deadline = time.monotonic() + 120
    # the first 15 uploads replace the first set's diseased images; the next ones add names
    while count(s3_client, location) < 31 + 10 and push.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(push.pid, signal.SIGKILL)
    push.wait()
    time.sleep(1)  # a request whose body had fully arrived may still be committed by the server

    objects = stored(s3_client, location)
    assert len(objects) < 301, "the push was not interrupted"
    assert objects["diseased/diseased_0000.png"] == (second / "diseased" / "diseased_0000.png").read_bytes()
    assert assert_one_whole_set_or_none(objects) is None  # the first set's manifest went before its files did
    listed = plantml(env, "data", "ls", location)
    assert (listed.returncode, listed.stdout.strip()) == (0, f"{location}: no data sets")
    training = plantml(env, "train", "--epochs", "1", "--image-size", "16", "--weights", "none", "--no-register",
                       "--data-dir", location)
    assert training.returncode == 2
    assert training.stderr.strip().splitlines() == [
        f"plantml: error: {location}: no data set there ({location}/{MANIFEST} not found): push one with `plantml data push`, "
        f"or list the sets under it with `plantml data ls {location}`"]

    resumed = plantml(env, "data", "push", str(second), location)  # the cut push, run again, finishes the set
    assert resumed.returncode == 0, resumed.stderr
    assert assert_one_whole_set_or_none(stored(s3_client, location)) == build_manifest(second).digest


def test_two_pushes_of_different_sets_to_one_location_at_once_end_with_one_whole_set_or_none(env, location, s3_client,
                                                                                              tmp_path):
    sets = [synth.generate(tmp_path / name, synth.SynthSpec(per_class=60, size=48, seed=seed))
            for name, seed in (("one", 11), ("two", 12))]
    digests = [build_manifest(folder).digest for folder in sets]
    pushes = [start_push(env, folder, location) for folder in sets]
    outcomes = []
    for push in pushes:
        out, err = push.communicate(timeout=300)
        outcomes.append((push.returncode, out, err))

    held = assert_one_whole_set_or_none(stored(s3_client, location))
    succeeded = [digest for digest, (code, _, _) in zip(digests, outcomes, strict=True) if code == 0]
    for code, _, err in outcomes:
        if code:  # the push that found the other's files says so in one line, as bad input
            assert code == 2 and len(err.strip().splitlines()) == 1 and location in err, err
    if held is None:
        assert len(succeeded) < 2, outcomes  # no set left, so the push that ended last cannot have said it stored one
    else:
        assert held in succeeded, outcomes  # a set is there only if its push reported success
        training_data = plantml(env, "data", "ls", location)
        assert training_data.returncode == 0 and training_data.stdout.strip().endswith(held)
