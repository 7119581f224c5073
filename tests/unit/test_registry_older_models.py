"""Versions registered by an older plantml train, next to current ones: the registry commands work on both."""

from __future__ import annotations

import uuid

import pytest

from plantml.cli import main


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Version 1 saved as plantml train saved models before 29 Nov 2026 (MLflow's pt2, a torch.export graph,
    exported in eval mode from a batch of two), version 2 pickled as now; returns (tracking URI, model name)."""
    import mlflow.pytorch
    import torch

    folder = tmp_path_factory.mktemp("older_models")
    uri, name = f"sqlite:///{folder}/mlflow.db", f"leaf_{uuid.uuid4().hex[:6]}"
    mlflow.set_tracking_uri(uri)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    # not mlflow.set_experiment: it leaves MLFLOW_EXPERIMENT_ID in the environment of the tests that follow
    experiment_id = mlflow.create_experiment(name, artifact_location=(folder / "artifacts").as_uri())
    for serialization_format in ("pt2", "pickle"):
        with mlflow.start_run(experiment_id=experiment_id):
            mlflow.pytorch.log_model(model, name="model", serialization_format=serialization_format,
                                     input_example=torch.rand(2, 3, 16, 16).numpy(), registered_model_name=name)
    mlflow.set_tracking_uri(None)
    return uri, name


@pytest.mark.parametrize("version", [1, 2], ids=["pt2-older-plantml", "pickle"])
def test_load_check_runs_a_batch_through_an_older_pt2_version_and_a_current_one(registry, version, capsys) -> None:
    uri, name = registry
    code = main(["registry", "--tracking-uri", uri, "load-check", f"models:/{name}/{version}", "--image-size", "16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip().endswith("batch 2x3x16x16 -> output (2, 2)")
