"""Registered models are plain PyTorch modules, the design's registry URIs work, and the
registry helpers use the registry they are given, against the real stack.

One ``plantml train`` run and one model logged through ``MLflowTracker.log_model`` are each
registered and promoted to Production; a fresh interpreter loads them through three URIs
(``/Production``, ``@production``, ``/1``) and exercises them as PyTorch users do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from _files import snapshot
from _models import CODE_PATHS, TinyNet

from plantml.registry import ModelRegistry
from plantml.training import synth
from plantml.training.models import image_batch_signature

SIZES = (32, 64, 224, 512)
BATCHES = (1, 3)

#: Loads each URI given in a new interpreter, uses it as a PyTorch user would, prints JSON.
FRESH_LOAD = """
import json, sys
import mlflow.pytorch, torch
report = {}
for uri in sys.argv[1:]:
    model = mlflow.pytorch.load_model(uri)
    entry = {"module": isinstance(model, torch.nn.Module), "type": type(model).__name__}
    model.train(); entry["train_mode"] = model.training
    model.eval(); entry["eval_mode"] = not model.training
    model = model.to("cpu"); entry["state_dict_keys"] = len(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        entry["outputs"] = {f"{b}x{s}": model(torch.rand(b, 3, s, s, generator=generator)).tolist()
                            for b in (1, 3) for s in (32, 64, 224, 512)}
    report[uri] = entry
print(json.dumps(report))
"""


def fresh_load(env: dict[str, str], *uris: str) -> dict[str, Any]:
    """Run FRESH_LOAD on ``uris`` in a new interpreter, from a folder where the tests' modules are not importable."""
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD, *uris], env=env, cwd=Path(sys.executable).parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_usable_and_identical(report: dict[str, Any], uris: tuple[str, ...]) -> None:
    """Each URI gives an nn.Module whose modes switch, and all give the same predictions of the right shape."""
    first = report[uris[0]]["outputs"]
    for uri in uris:
        entry = report[uri]
        assert entry["module"] and entry["train_mode"] and entry["eval_mode"], (uri, entry)
        assert entry["state_dict_keys"] > 0
        for batch in BATCHES:
            for size in SIZES:
                out = torch.tensor(entry["outputs"][f"{batch}x{size}"])
                assert out.shape == (batch, 2), (uri, batch, size)
                torch.testing.assert_close(out, torch.tensor(first[f"{batch}x{size}"]), rtol=0, atol=1e-5)


def stages(client: Any, name: str) -> dict[str, str]:
    return {mv.version: mv.current_stage for mv in client.search_model_versions(f"name='{name}'")}


#: The set's class folders: a comma in one name, and an order that a locale's collation would reverse.
CLASS_FOLDERS = ("Rust, leaf", "healthy")


@pytest.fixture(scope="module")
def leaves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=10, size=32, seed=3))
    (root / "diseased").rename(root / CLASS_FOLDERS[0])
    return root


@pytest.fixture(scope="module")
def trained(mlflow_stack: Any, leaves: Path) -> dict[str, Any]:
    """A ``plantml train`` run registered as version 1 of a fresh name and promoted to Production; its model registered
    again as version 2 (what the tests of stages need is a second version, not a second training)."""
    name = f"resnet18_plants_{uuid.uuid4().hex[:8]}"
    experiment = f"test_models_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **mlflow_stack.client_env()}
    done = subprocess.run(
        [sys.executable, "-m", "plantml", "train", "--epochs", "1", "--batch-size", "8", "--image-size", "32",
         "--weights", "none", "--num-workers", "0", "--seed", "1", "--data-dir", str(leaves),
         "--experiment-name", experiment, "--registered-model-name", name],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_stack.tracking_uri)
    first = client.get_model_version(name, "1")
    model_id = first.source.removeprefix("models:/")  # a logged model's own URI, as plantml registers it
    assert client.create_model_version(name, first.source, run_id=first.run_id, model_id=model_id).version == "2"
    registry = ModelRegistry(mlflow_stack.tracking_uri)
    registry.promote(name, 1, "Production")
    return {"name": name, "stdout": done.stdout, "env": env}


def test_train_ends_by_printing_the_runs_url_in_the_model_training_view(trained: dict[str, Any], mlflow_client: Any) -> None:
    line = next(line for line in trained["stdout"].splitlines() if line.startswith("see the run: "))
    url = line.removeprefix("see the run: ")
    version = mlflow_client.get_model_version(trained["name"], "1")
    run = mlflow_client.get_run(version.run_id)
    assert url == (f"{mlflow_client.tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                   "?workflowType=machine_learning")


def test_a_trained_model_loads_as_a_module_through_the_designs_three_uris(trained: dict[str, Any]) -> None:
    name = trained["name"]
    uris = (f"models:/{name}/Production", f"models:/{name}@production", f"models:/{name}/1")
    report = fresh_load(trained["env"], *uris)
    assert {entry["type"] for entry in report.values()} == {"ResNet"}
    assert_usable_and_identical(report, uris)


def test_promotion_and_rollback_move_stage_and_alias_together(trained: dict[str, Any], mlflow_client: Any) -> None:
    name = trained["name"]
    registry = ModelRegistry(mlflow_client.tracking_uri)
    assert stages(mlflow_client, name) == {"1": "Production", "2": "None"}

    registry.promote(name, 2, "production")
    assert mlflow_client.get_model_version_by_alias(name, "production").version == "2"
    assert stages(mlflow_client, name) == {"1": "Archived", "2": "Production"}

    registry.rollback(name, "Production")
    assert mlflow_client.get_model_version_by_alias(name, "production").version == "1"
    assert stages(mlflow_client, name) == {"1": "Production", "2": "Archived"}

    registry.promote(name, 2, "Staging")
    assert mlflow_client.get_model_version_by_alias(name, "staging").version == "2"
    assert stages(mlflow_client, name) == {"1": "Production", "2": "Staging"}


def test_the_checkpoint_path_loads_the_same_weights_without_pickle(trained: dict[str, Any], mlflow_env: Any) -> None:
    registry = ModelRegistry(mlflow_env.tracking_uri)
    pickled = registry.load_model(trained["name"], 1).eval()
    rebuilt = registry.load_checkpoint(f"models:/{trained['name']}/1")
    batch = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch), pickled(batch), rtol=0, atol=1e-5)
    assert not rebuilt.training


def test_a_model_logged_through_the_tracker_loads_the_same_way(mlflow_stack: Any) -> None:
    from plantml.tracking import MLflowTracker

    name = f"tiny_plants_{uuid.uuid4().hex[:8]}"
    torch.manual_seed(11)
    tracker = MLflowTracker(tracking_uri=mlflow_stack.tracking_uri, experiment_name=f"test_models_{uuid.uuid4().hex[:8]}",
                            s3_endpoint=mlflow_stack.s3_endpoint, aws_access_key=mlflow_stack.aws_access_key,
                            aws_secret_key=mlflow_stack.aws_secret_key)
    with tracker.start_run(run_name="tiny"):
        info = tracker.log_model(TinyNet(), registered_model_name=name, input_example=torch.rand(2, 3, 32, 32).numpy(),
                                 signature=image_batch_signature(2), code_paths=CODE_PATHS)
    ModelRegistry(mlflow_stack.tracking_uri).promote(name, info.registered_model_version, "Production")
    uris = (f"models:/{name}/Production", f"models:/{name}@production", f"models:/{name}/1")
    report = fresh_load({**os.environ, **mlflow_stack.client_env()}, *uris)
    assert {entry["type"] for entry in report.values()} == {"TinyNet"}
    assert_usable_and_identical(report, uris)


#: Plain MLflow, PIL and numpy in a new interpreter: the classes and the preprocessing read off the model alone.
FRESH_PREDICT = """
import json, sys
import mlflow.models, mlflow.pyfunc, numpy as np
from PIL import Image
uri, image = sys.argv[1:]
meta = mlflow.models.get_model_info(uri).metadata
height, width = meta["image_size"]
pixels = np.asarray(Image.open(image).convert(meta["color"]).resize((width, height), Image.BILINEAR), np.float32) / 255
batch = ((pixels - meta["mean"]) / meta["std"]).transpose(2, 0, 1)[None].astype(np.float32)
print(json.dumps({"classes": meta["classes"], "logits": np.asarray(mlflow.pyfunc.load_model(uri).predict(batch)).tolist()}))
"""


def test_the_class_names_and_preprocessing_travel_with_the_registered_model(trained: dict[str, Any], mlflow_env: Any,
                                                                             tmp_path: Path) -> None:
    from PIL import Image

    from plantml.training.data import build_transforms

    photo = tmp_path / "photo.jpg"  # not the training size: the consumer must resize as training did
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(photo, quality=95)
    done = subprocess.run([sys.executable, "-c", FRESH_PREDICT, f"models:/{trained['name']}@production", str(photo)],
                          env=trained["env"], cwd=Path(sys.executable).parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served["classes"] == list(CLASS_FOLDERS)  # the output columns' order, a name with a comma whole
    model = ModelRegistry(mlflow_env.tracking_uri).load_checkpoint(trained["name"], 1)
    with torch.no_grad():  # what the training's own evaluation does to that photo
        expected = model(build_transforms(32, train=False)(Image.open(photo).convert("RGB"))[None])
    torch.testing.assert_close(torch.tensor(served["logits"]), expected, rtol=0, atol=1e-4)


DECOY = """
import mlflow, mlflow.pytorch, torch
mlflow.set_tracking_uri("sqlite:///mlflow.db")
with mlflow.start_run():
    mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="model", registered_model_name=__import__("sys").argv[1],
                             serialization_format="pickle", pip_requirements=["torch"])  # inferring them: 6 s more
"""

REGISTRY_LOAD = """
import sys, torch
from plantml.registry import ModelRegistry
model = ModelRegistry(sys.argv[1]).load_model(sys.argv[2], 1)
print(type(model).__name__)
"""


@pytest.mark.local_session
def test_registry_helpers_use_their_uri_beside_a_decoy_store_and_leave_nothing(
        trained: dict[str, Any], mlflow_stack: Any, tmp_path: Path) -> None:
    name = trained["name"]
    decoy, scratch = tmp_path / "decoy", tmp_path / "tmp"
    decoy.mkdir()
    scratch.mkdir()
    base_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    made = subprocess.run([sys.executable, "-c", DECOY, name], cwd=decoy, env=base_env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    before = snapshot(decoy)
    assert "mlflow.db" in before

    # The server's S3 settings are in the environment; the tracking URI only on the command line.
    env = {**base_env, **{k: v for k, v in mlflow_stack.client_env().items() if k != "MLFLOW_TRACKING_URI"},
           "TMPDIR": str(scratch)}
    uri = mlflow_stack.tracking_uri
    loaded = subprocess.run([sys.executable, "-c", REGISTRY_LOAD, uri, name], cwd=decoy, env=env,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["ResNet"]

    # the command line too (a process: seconds of imports); the loading through the API is above
    done = subprocess.run([sys.executable, "-m", "plantml", "registry", "--tracking-uri", uri, "list"], cwd=decoy, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(line.split()[:3] == [name, "1", "Production"] for line in done.stdout.splitlines()), done.stdout

    assert snapshot(decoy) == before
    assert list(scratch.iterdir()) == []


def test_a_load_check_failure_is_one_line(trained: dict[str, Any], mlflow_env: Any) -> None:
    done = subprocess.run([sys.executable, "-m", "plantml", "registry", "load-check", f"models:/{trained['name']}/7"],
                          env={**os.environ, **mlflow_env.client_env()}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"plantml: error: model {trained['name']!r} version 7: not found"]
