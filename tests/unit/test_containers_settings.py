"""The containers backend described as data: settings, commands, labels, image fingerprints (no Docker needed)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from plantml.errors import ConfigError
from plantml.stack import BACKENDS, make_stack
from plantml.stack.containers import ContainerSettings, ContainersStack
from plantml.stack.docker_api import LABEL_HOST, LABEL_PID, LABEL_PID_START, owner_is_gone, owner_labels
from plantml.stack.images import FINGERPRINT_ENV, ImageRecipe, recipes

IMAGE_VARIABLES = ("PLANTML_POSTGRES_IMAGE", "PLANTML_S3_IMAGE", "PLANTML_MLFLOW_IMAGE", "PLANTML_S3_FLAVOUR",
                   "PLANTML_CONTAINER_NETWORK")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in IMAGE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_containers_is_a_backend_and_make_stack_builds_one():
    assert "containers" in BACKENDS
    stack = make_stack("containers", "proxied", images={"mlflow_image": "given/mlflow:1"}, durable=False)
    assert isinstance(stack, ContainersStack)
    assert stack.spec.mlflow.artifact_mode == "proxied"
    assert stack.settings.mlflow_image == "given/mlflow:1" and stack.spec.postgres.durable is False


def test_default_images_are_the_ones_build_images_makes():
    settings = ContainerSettings.from_env()
    assert settings.postgres_image == "plantml/postgres:15"
    assert settings.s3_image.startswith("plantml/seaweedfs:")
    assert settings.mlflow_image == "plantml/mlflow-server:3.17.2"
    assert {r.name for r in recipes().values()} == {settings.postgres_image, settings.s3_image, settings.mlflow_image}


def test_every_image_is_overridable_by_environment_and_explicit_values_win(monkeypatch):
    monkeypatch.setenv("PLANTML_POSTGRES_IMAGE", "postgres:15-alpine")
    monkeypatch.setenv("PLANTML_S3_IMAGE", "env/s3:1")
    monkeypatch.setenv("PLANTML_MLFLOW_IMAGE", "env/mlflow:1")
    settings = ContainerSettings.from_env(mlflow_image="given/mlflow:2")
    assert (settings.postgres_image, settings.s3_image, settings.mlflow_image) == ("postgres:15-alpine", "env/s3:1", "given/mlflow:2")


def test_the_minio_flavour_defaults_to_the_minio_image_and_reaches_the_s3_description(monkeypatch):
    monkeypatch.setenv("PLANTML_S3_FLAVOUR", "minio")
    assert ContainerSettings.from_env().s3_image == "minio/minio:latest"
    assert ContainersStack().spec.s3.flavour == "minio"


@pytest.mark.parametrize("field,value", [("s3_flavour", "ceph"), ("container_network", "overlay")])
def test_an_unknown_flavour_or_network_is_refused(field, value):
    with pytest.raises(ConfigError, match=value):
        ContainerSettings.from_env(**{field: value})


def test_containers_are_labelled_with_their_owner_process():
    labels = owner_labels("abc")
    assert labels[LABEL_PID] == str(os.getpid())
    assert not owner_is_gone(labels)


def test_a_container_whose_owner_process_is_gone_is_an_orphan():
    labels = {**owner_labels("abc"), LABEL_PID: "999999999"}
    assert owner_is_gone(labels)
    reused_pid = {**owner_labels("abc"), LABEL_PID_START: "0"}  # same pid, another process
    assert owner_is_gone(reused_pid)


def test_another_hosts_container_is_never_judged_an_orphan():
    labels = {**owner_labels("abc"), LABEL_PID: "999999999", LABEL_HOST: socket.gethostname() + "-other"}
    assert not owner_is_gone(labels)


def test_an_image_fingerprint_changes_with_its_inputs_only(tmp_path: Path):
    binary = tmp_path / "weed"
    binary.write_bytes(b"v1")
    recipe = ImageRecipe(service="s3", name="x:1", files=((str(binary), "/usr/local/bin/weed"),))
    first = recipe.fingerprint()
    assert ImageRecipe(service="s3", name="x:1", files=((str(binary), "/usr/local/bin/weed"),)).fingerprint() == first
    binary.write_bytes(b"v2")
    os.utime(binary, ns=(1, 1))
    assert recipe.fingerprint() != first
    assert ImageRecipe(service="mlflow", name="m", pip_requirements=("a==1",)).fingerprint() != \
        ImageRecipe(service="mlflow", name="m", pip_requirements=("a==2",)).fingerprint()


def test_every_recipe_records_its_fingerprint_in_the_image():
    for recipe in recipes().values():
        assert not any(FINGERPRINT_ENV in change for change in recipe.changes)  # added at import time, not a fixed input
        assert len(recipe.fingerprint()) == 16
