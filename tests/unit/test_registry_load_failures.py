"""Loading a registered model whose files cannot be read: one line naming the culprit, never a traceback.

The versions live in a local sqlite registry, their files at ``s3://`` locations of an
object store that is not there (a closed loopback port) or that this client has no keys for.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from _tempdir import left_in

from plantml.cli.registry import QUICK_HTTP_ENV

#: A loopback port nothing listens on: every request to it is refused at once.
CLOSED_ENDPOINT = "http://127.0.0.1:1"
S3_VARIABLES = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A model of one version whose run and files are in S3; returns (tracking URI, model name)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('s3_model')}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = f"plants_{uuid.uuid4().hex[:6]}"
    experiment_id = client.create_experiment(name, artifact_location=f"s3://mlflow/{name}")
    run = client.create_run(experiment_id)
    client.create_registered_model(name)
    client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return uri, name


@pytest.fixture
def s3_model(s3_store: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """:func:`s3_store`'s model, from a folder without .env and an environment without S3 settings."""
    monkeypatch.chdir(tmp_path)
    for key in (*QUICK_HTTP_ENV, *S3_VARIABLES, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    # boto3 must find no keys in files and ask no metadata service, and give up on the first refusal.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return s3_store


def load_check(uri: str, name: str, *flags: str, capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from plantml.cli import main

    code = main(["registry", "--tracking-uri", uri, "load-check", f"models:/{name}/1", *flags])
    return code, capfd.readouterr().err


@pytest.mark.parametrize("flags", [(), ("--no-pickle",)], ids=["pickle", "no-pickle"])
def test_an_object_store_that_refuses_the_connection_is_named_in_one_line_exit_1(
    s3_model: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], flags: tuple[str, ...]
) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", CLOSED_ENDPOINT)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "plantml-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    code, err = load_check(*s3_model, *flags, capfd=capfd)
    assert code == 1, err
    assert err.startswith(f"plantml: error: model '{s3_model[1]}' version 1: object store {CLOSED_ENDPOINT} failed ("), err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("flags", [(), ("--no-pickle",)], ids=["pickle", "no-pickle"])
def test_a_client_without_s3_keys_is_told_which_variables_to_set_exit_2(
    s3_model: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], flags: tuple[str, ...]
) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", CLOSED_ENDPOINT)
    code, err = load_check(*s3_model, *flags, capfd=capfd)
    assert code == 2, err
    assert "this client has no S3 keys: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """A model of one version whose run keeps its artifacts in a local folder; returns (URI, name, that folder)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("local_model")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = f"plants_{uuid.uuid4().hex[:6]}"
    run = client.create_run(client.create_experiment(name, artifact_location=str(folder / "artifacts")))
    client.create_registered_model(name)
    client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return uri, name, Path(run.info.artifact_uri)


def _truncated_checkpoint() -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"backbone": "resnet18", "num_classes": 2, "model_state_dict": {"w": torch.zeros(256)}}, buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize("content", [b"garbage", None], ids=["garbage", "truncated"])
def test_a_damaged_checkpoint_is_one_line_naming_it_not_a_traceback(
    local_store: tuple[str, str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    content: bytes | None,
) -> None:
    uri, name, artifacts = local_store
    (artifacts / "models").mkdir(parents=True, exist_ok=True)
    (artifacts / "models" / "best_model.pth").write_bytes(content if content is not None else _truncated_checkpoint())
    monkeypatch.chdir(tmp_path)
    code, err = load_check(uri, name, "--no-pickle", capfd=capfd)
    assert code == 2, err
    assert err.startswith(f"plantml: error: model '{name}' version 1: models/best_model.pth in its run's artifacts cannot be read"), err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize(("deleted", "message"), [("data/model.pth", "no model.pth or model.pt2 under"), ("", "no MLmodel at")],
                         ids=["weights", "every-file"])
def test_a_model_whose_files_were_deleted_from_the_store_says_so_in_one_line(
    local_store: tuple[str, str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    deleted: str, message: str,
) -> None:
    import shutil

    import mlflow.pytorch
    import torch

    uri, name, artifacts = local_store
    shutil.rmtree(artifacts / "model", ignore_errors=True)
    mlflow.pytorch.save_model(torch.nn.Linear(2, 2), str(artifacts / "model"), serialization_format="pickle",
                              pip_requirements=["torch"])
    for path in [artifacts / "model" / deleted] if deleted else list((artifacts / "model").iterdir()):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()  # MLflow's warning about saving a pickle
    code, err = load_check(uri, name, capfd=capfd)
    assert code == 2, err
    assert err.startswith(f"plantml: error: model '{name}' version 1: {message}"), err
    assert err.endswith("missing from the artifact store\n") and err.count("\n") == 1, err


#: The README's Python loading example in a new interpreter, with MLflow's own client settings.
LOAD_FROM = """
import sys, time
from plantml.errors import TrackingError
from plantml.registry import ModelRegistry
started = time.monotonic()
try:
    ModelRegistry(sys.argv[1]).load_model("resnet18_plant_classifier", "production")
except TrackingError as exc:
    print(f"{time.monotonic() - started:.1f} {exc}")
"""


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_loading_from_a_stack_that_is_down_fails_in_seconds_in_one_line(server: str, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if server == "silent":
            sock.listen()  # the kernel accepts connections, nothing ever answers: a hung server
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
        done = subprocess.run([sys.executable, "-c", LOAD_FROM, uri], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=90)  # MLflow's client alone: 249 s refused, 120 s per try silent
    seconds, _, message = done.stdout.strip().partition(" ")
    assert message == (f"registered model 'resnet18_plant_classifier': {uri}: tracking server not reachable; "
                       "this URI came from argument"), done.stderr[-2000:]
    assert float(seconds) < 30


@pytest.mark.parametrize("flags", [()], ids=["pickle"])  # --no-pickle reads through the same check (10 s each)
def test_an_object_store_that_never_answers_is_named_in_one_line_in_seconds(
    s3_model: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], flags: tuple[str, ...]
) -> None:
    import time

    monkeypatch.delenv("AWS_MAX_ATTEMPTS")  # boto3's own tries, as a user has them
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # a hung object store: the kernel accepts, nothing answers
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "plantml-test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
        started = time.monotonic()
        code, err = load_check(*s3_model, *flags, capfd=capfd)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"plantml: error: model '{s3_model[1]}' version 1: object store {endpoint} failed ("), err
    assert time.monotonic() - started < 30  # boto3 alone: 60 s a try, 3 tries (193 s measured)


@pytest.mark.parametrize("no_pickle", [False, True], ids=["pickle", "checkpoint"])
def test_a_load_leaves_nothing_in_the_temporary_folder_and_sweeps_what_a_killed_load_left(
    local_store: tuple[str, str, Path], killed_leftover: Callable[[str], Path], no_pickle: bool,
) -> None:
    """Was: the download went to a tempfile.TemporaryDirectory, which a kill -9 during the load left in /tmp for
    good (a resnet50's: 100 MB each time) and a SIGTERM landing just after its mkdir left too."""
    import shutil

    import mlflow.pytorch
    import torch

    from plantml.registry import ModelRegistry
    from plantml.training.models import WeightsChoice, build_model

    uri, name, artifacts = local_store
    shutil.rmtree(artifacts / "model", ignore_errors=True)
    mlflow.pytorch.save_model(torch.nn.Linear(2, 2), str(artifacts / "model"), serialization_format="pickle",
                              pip_requirements=["torch"])
    (artifacts / "models").mkdir(parents=True, exist_ok=True)
    model = build_model("mobilenet_v2", 2, WeightsChoice("none"))
    torch.save({"backbone": "mobilenet_v2", "num_classes": 2, "model_state_dict": model.state_dict()},
               artifacts / "models" / "best_model.pth")
    temp = killed_leftover("plantml-model")

    registry = ModelRegistry(uri)
    loaded = registry.load_checkpoint(name, 1) if no_pickle else registry.load_model(name, 1)

    assert isinstance(loaded, torch.nn.Module)
    assert left_in(temp) == []  # the dead one's swept, this one's removed


@pytest.mark.parametrize("flags", [(), ("--no-pickle",)], ids=["pickle", "no-pickle"])
def test_a_temporary_folder_that_fills_up_during_the_download_is_named_in_one_line_and_left_empty(
    local_store: tuple[str, str, Path], killed_leftover: Callable[[str], Path], capfd: pytest.CaptureFixture[str],
    flags: tuple[str, ...], request: pytest.FixtureRequest,
) -> None:
    """Was: "model 'x' version 1: The following failures occurred while downloading one or more artifacts from …:",
    MLflow's first line, without the reason (the disk) nor the folder, exit 1 as if the store had failed."""
    import shutil

    import mlflow.pytorch
    import torch

    from plantml.training.models import WeightsChoice, build_model

    uri, name, artifacts = local_store
    model = build_model("mobilenet_v2", 2, WeightsChoice("none"))  # 9 MB: past the 1 MiB a file may have below
    shutil.rmtree(artifacts / "model", ignore_errors=True)
    mlflow.pytorch.save_model(model, str(artifacts / "model"), serialization_format="pickle", pip_requirements=["torch"])
    (artifacts / "models").mkdir(parents=True, exist_ok=True)
    torch.save({"backbone": "mobilenet_v2", "num_classes": 2, "model_state_dict": model.state_dict()},
               artifacts / "models" / "best_model.pth")
    temp = killed_leftover("plantml-model")
    capfd.readouterr()
    request.getfixturevalue("files_of_at_most_one_mib")

    code, err = load_check(uri, name, *flags, capfd=capfd)

    assert code == 1, err
    assert err == (f"plantml: error: model '{name}' version 1: its download to the temporary folder (TMPDIR) {temp}: "
                   "file too large\n")
    assert left_in(temp) == []


def test_a_file_the_store_lists_but_cannot_give_is_named_with_its_reason_in_one_line(
    local_store: tuple[str, str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    """Was: "tracking server sqlite:///…/mlflow.db unreachable (…)", for a file of the artifact store that a link
    names but that is gone: the store's failure, with its file and reason, exit 1."""
    import shutil

    import mlflow.pytorch
    import torch

    uri, name, artifacts = local_store
    shutil.rmtree(artifacts / "model", ignore_errors=True)
    mlflow.pytorch.save_model(torch.nn.Linear(2, 2), str(artifacts / "model"), serialization_format="pickle",
                              pip_requirements=["torch"])
    weights = artifacts / "model" / "data" / "model.pth"
    weights.unlink()
    weights.symlink_to(tmp_path / "gone.pth")  # listed by the store, unreadable when copied
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()

    code, err = load_check(uri, name, capfd=capfd)

    assert code == 1, err
    assert err.startswith(f"plantml: error: model '{name}' version 1: its files at {artifacts / 'model'} cannot be "
                          f"read ([Errno 2] No such file or directory: '{weights}')"), err
    assert err.count("\n") == 1, err


def test_a_download_folder_that_cannot_be_made_is_named_as_the_download_folder_not_the_server(
    local_store: tuple[str, str, Path], tmp_path: Path,
) -> None:
    """Was: "tracking server sqlite:///… unreachable (…)" for a ``dst_path`` under a file."""
    import shutil

    import mlflow.pytorch
    import torch

    from plantml.errors import UsageError
    from plantml.registry import ModelRegistry

    uri, name, artifacts = local_store
    shutil.rmtree(artifacts / "model", ignore_errors=True)
    mlflow.pytorch.save_model(torch.nn.Linear(2, 2), str(artifacts / "model"), serialization_format="pickle",
                              pip_requirements=["torch"])
    (tmp_path / "a-file").write_text("not a folder")

    with pytest.raises(UsageError) as failure:
        ModelRegistry(uri).download(name, 1, str(tmp_path / "a-file" / "model"))

    assert str(failure.value) == f"download folder {tmp_path / 'a-file' / 'model'}: not a directory"
