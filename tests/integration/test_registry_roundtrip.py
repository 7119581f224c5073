"""The model registry against the real stack: versions, aliases, rollback, loading, fresh processes.

Two small trainings log real PyTorch models (pickled modules, any batch and image size)
through plantml's tracker and register them as versions 1 and 2 of a model named for
this module. Results are read back through a plain ``MlflowClient`` as well as plantml.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _models import CODE_PATHS, TinyNet
from click.testing import CliRunner

from plantml.errors import RegistryError
from plantml.registry import ModelRegistry, alias_tag
from plantml.training.models import image_batch_signature

ATOL = 1e-5


def train_and_register(stack: Any, experiment_name: str, model_name: str, seed: int, lr: float) -> tuple[TinyNet, int]:
    """A few SGD steps on random images, logged and registered through plantml's tracker."""
    from plantml.tracking import MLflowTracker

    torch.manual_seed(seed)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 2, (8,))
    tracker = MLflowTracker(
        tracking_uri=stack.tracking_uri,
        experiment_name=experiment_name,
        s3_endpoint=stack.s3_endpoint,
        aws_access_key=stack.aws_access_key,
        aws_secret_key=stack.aws_secret_key,
    )
    with tracker.start_run(run_name=f"tiny-seed{seed}"):
        tracker.log_params({"seed": seed, "lr": lr, "backbone": "tinynet"})
        for step in range(3):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            tracker.log_metric("train_loss", loss.item(), step=step)
        model.eval()
        with torch.no_grad():
            accuracy = float((model(images).argmax(1) == labels).float().mean())
        tracker.log_metric("val_accuracy", accuracy)
        info = tracker.log_model(
            model,
            artifact_path="model",
            registered_model_name=model_name,
            input_example=torch.rand(2, 3, 32, 32).numpy(),
            signature=image_batch_signature(2),
            code_paths=CODE_PATHS,
        )
    return model, int(info.registered_model_version)


@pytest.fixture(scope="module")
def trained(mlflow_stack: Any) -> dict[str, Any]:
    """Two trainings registered as versions 1 and 2 of a fresh model name."""
    model_name = f"tiny_plants_{uuid.uuid4().hex[:8]}"
    experiment = f"test_registry_{uuid.uuid4().hex[:8]}"
    first, v1 = train_and_register(mlflow_stack, experiment, model_name, seed=1, lr=0.1)
    second, v2 = train_and_register(mlflow_stack, experiment, model_name, seed=2, lr=0.05)
    return {"name": model_name, "models": {v1: first, v2: second}, "versions": (v1, v2)}


@pytest.fixture
def registry(mlflow_env: Any) -> ModelRegistry:
    return ModelRegistry(mlflow_env.tracking_uri)


def outputs(model: Any, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(batch).numpy()


def test_two_trainings_give_versions_1_and_2_linked_to_their_runs(trained: dict[str, Any], mlflow_client: Any) -> None:
    assert trained["versions"] == (1, 2)
    versions = sorted(mlflow_client.search_model_versions(f"name='{trained['name']}'"), key=lambda mv: int(mv.version))
    runs = [mlflow_client.get_run(mv.run_id) for mv in versions]
    assert [run.data.params["seed"] for run in runs] == ["1", "2"]


def test_list_versions_shows_runs_metrics_and_aliases(trained: dict[str, Any], registry: ModelRegistry, mlflow_client: Any) -> None:
    versions = registry.list_versions(trained["name"])
    assert [v.version for v in versions] == [1, 2]
    assert versions[0].run_id == mlflow_client.get_model_version(trained["name"], "1").run_id
    assert set(versions[1].metrics) >= {"train_loss", "val_accuracy"}
    for listed in versions:  # each version shows its own run's figures (the runs are read side by side)
        run = mlflow_client.get_run(mlflow_client.get_model_version(trained["name"], str(listed.version)).run_id)
        assert listed.params["seed"] == run.data.params["seed"]
        assert listed.metrics == dict(run.data.metrics)


def test_promote_load_rollback_and_load_again(trained: dict[str, Any], registry: ModelRegistry, mlflow_client: Any) -> None:
    name, models = trained["name"], trained["models"]
    batch = torch.rand(3, 3, 48, 40)

    registry.promote(name, 1, "Production")
    registry.promote(name, 2, "production")
    assert mlflow_client.get_model_version_by_alias(name, "production").version == "2"
    np.testing.assert_allclose(outputs(registry.load_model(f"models:/{name}@production"), batch), outputs(models[2], batch), atol=ATOL)

    move = registry.rollback(name, "PRODUCTION")
    assert (move.from_version, move.to_version) == (2, 1)
    assert mlflow_client.get_model_version_by_alias(name, "production").version == "1"
    assert mlflow_client.get_model_version(name, "1").tags[alias_tag("production", "rolled_back_from")] == "2"
    np.testing.assert_allclose(outputs(registry.load_model(name, "production"), batch), outputs(models[1], batch), atol=ATOL)
    # The design's stage-style URI means the alias.
    np.testing.assert_allclose(outputs(registry.load_model(f"models:/{name}/Production"), batch), outputs(models[1], batch), atol=ATOL)


def test_load_by_version_and_latest(trained: dict[str, Any], registry: ModelRegistry) -> None:
    name, models = trained["name"], trained["models"]
    batch = torch.rand(2, 3, 32, 32)
    np.testing.assert_allclose(outputs(registry.load_model(f"models:/{name}/1"), batch), outputs(models[1], batch), atol=ATOL)
    np.testing.assert_allclose(outputs(registry.load_model(f"models:/{name}/latest"), batch), outputs(models[2], batch), atol=ATOL)


def test_compare_shows_both_versions_params_and_metrics(trained: dict[str, Any], registry: ModelRegistry) -> None:
    comparison = registry.compare(trained["name"], 1, 2)
    params = {row.key: (row.first, row.second) for row in comparison.params}
    assert params["lr"] == ("0.1", "0.05")
    assert {row.key for row in comparison.metrics} >= {"train_loss", "val_accuracy"}


def test_unknown_version_and_alias_are_one_line_errors(trained: dict[str, Any], registry: ModelRegistry) -> None:
    with pytest.raises(RegistryError, match=r"version 99: not found"):
        registry.load_model(trained["name"], 99)
    with pytest.raises(RegistryError, match=r"alias 'ghost': not set"):
        registry.load_model(f"models:/{trained['name']}@ghost")
    with pytest.raises(RegistryError, match=r"registered model 'no_such_model_x': not found"):
        registry.list_versions("no_such_model_x")


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from plantml.registry import ModelRegistry
    uri, model_uri, folder = sys.argv[1:]
    model = ModelRegistry(uri).load_model(model_uri)
    batches = np.load(f"{folder}/batches.npz")
    with torch.no_grad():
        np.savez(f"{folder}/outputs.npz", **{k: model(torch.from_numpy(batches[k])).numpy() for k in batches.files})
    """
)


def test_a_fresh_process_predicts_what_the_logged_model_predicted(trained: dict[str, Any], mlflow_env: Any, tmp_path: Path) -> None:
    """One image, and five images larger than the input example, loaded by version in a new interpreter."""
    name, model = trained["name"], trained["models"][2]
    batches = {"one_image": torch.rand(1, 3, 32, 32).numpy(), "five_larger": torch.rand(5, 3, 64, 48).numpy()}
    np.savez(tmp_path / "batches.npz", **batches)
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, mlflow_env.tracking_uri, f"models:/{name}/2", str(tmp_path)],
        env={**os.environ, **mlflow_env.client_env()},
        check=True,
        timeout=180,
    )
    got = np.load(tmp_path / "outputs.npz")
    for key, batch in batches.items():
        np.testing.assert_allclose(got[key], outputs(model, torch.from_numpy(batch)), atol=ATOL, err_msg=key)


def test_registry_command_lists_versions_and_refuses_reserved_aliases(trained: dict[str, Any], mlflow_env: Any) -> None:
    from plantml.cli import cli
    from plantml.cli.registry import QUICK_HTTP_ENV

    keys = [*QUICK_HTTP_ENV, "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    runner = CliRunner(env={key: os.environ.get(key) for key in keys})
    listed = runner.invoke(cli, ["registry", "--tracking-uri", mlflow_env.tracking_uri, "list", trained["name"]])
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["VERSION", "STAGE", "ALIASES", "RUN", "STATUS", "CREATED", "METRICS"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2"]
    refused = runner.invoke(cli, ["registry", "--tracking-uri", mlflow_env.tracking_uri, "promote", trained["name"], "1", "--alias", "latest"])
    assert refused.exit_code != 0


@pytest.mark.local_session
def test_registry_commands_read_the_stack_from_a_dot_env_file_alone(trained: dict[str, Any], mlflow_stack: Any,
                                                                  tmp_path: Path) -> None:
    """The folder's .env is the only place the tracking URI and the S3 keys are (as `stack up --env-file .env`
    leaves them): loading a version reads its files from S3 with those keys."""
    (tmp_path / ".env").write_text("".join(f"{key}={value}\n" for key, value in mlflow_stack.client_env().items()))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MLFLOW_", "BOTO"))}
    env["HOME"] = str(tmp_path)  # no ~/.aws to fall back on
    out = subprocess.run([sys.executable, "-m", "plantml", "registry", "load-check", f"models:/{trained['name']}/1",
                          "--image-size", "32"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"models:/{trained['name']}/1: loaded TinyNet; batch 2x3x32x32 -> output (2, 2)"


def test_two_promotions_at_once_leave_one_version_holding_both_the_alias_and_the_stage(
    trained: dict[str, Any], mlflow_env: Any, mlflow_client: Any
) -> None:
    """Each round, two threads promote two different versions at the same moment; whichever wins,
    models:/NAME@production and models:/NAME/Production must name the same single version."""
    name = f"race_{uuid.uuid4().hex[:8]}"
    source = mlflow_client.get_model_version(trained["name"], "1")
    mlflow_client.create_registered_model(name)
    for _ in range(4):
        mlflow_client.create_model_version(name, source=source.source, run_id=source.run_id,
                                          model_id=source.source.rsplit("/", 1)[-1])  # MLflow 3: source is models:/<model id>
    registries = [ModelRegistry(mlflow_env.tracking_uri) for _ in range(2)]
    for round_number in range(4):
        pair = (1, 2) if round_number % 2 else (3, 4)  # neither holds the alias when the round starts
        barrier, errors = threading.Barrier(2), []

        def promote(registry: ModelRegistry, version: int) -> None:
            barrier.wait()  # noqa: B023 - each round's threads are joined before the next round
            try:
                registry.promote(name, version)
            except Exception as exc:  # reported below, with the round
                errors.append(exc)  # noqa: B023

        threads = [threading.Thread(target=promote, args=(registry, version)) for registry, version in zip(registries, pair)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        holder = mlflow_client.get_model_version_by_alias(name, "production").version
        staged = [mv.version for mv in mlflow_client.search_model_versions(f"name='{name}'") if mv.current_stage == "Production"]
        assert not errors and int(holder) in pair and staged == [holder], (round_number, errors, holder, staged)
