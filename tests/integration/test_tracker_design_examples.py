"""The design's own example calls (sections "MLflowTracker" and "Via l'API Python"), as written.

Only the addresses change: the design's localhost ports become the test stack's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from plantml.tracking import MLflowTracker


@pytest.fixture
def design_folder(tmp_path, monkeypatch, experiment_name, mlflow_stack):
    """The working folder of the design's training script, with what its examples log."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    # The design's experiment is plant_classification; a fresh one keeps this test independent.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment_name)
    Path("model.pth").write_bytes(b"best weights")
    Path("logs").mkdir()
    Path("logs/train.log").write_text("epoch 10: val_acc 0.93\n")
    return tmp_path


def test_design_mlflow_tracker_section(design_folder, mlflow_stack, experiment_name, capsys) -> None:
    import matplotlib.pyplot as plt
    import mlflow
    import torch

    fig, ax = plt.subplots()
    ax.imshow([[50, 2], [3, 45]])
    history = {"train_loss": [0.5, 0.1], "val_accuracy": [0.9, 0.93]}
    summary = "ResNet18, 11,689,538 parameters"
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    epoch = 10

    tracker = MLflowTracker(
        tracking_uri=mlflow_stack.tracking_uri,
        experiment_name=experiment_name,
        s3_endpoint=mlflow_stack.s3_endpoint,
        aws_access_key=mlflow_stack.aws_access_key,
        aws_secret_key=mlflow_stack.aws_secret_key,
    )
    tracker.start_run(run_name="resnet18_experiment", tags={"model": "resnet18"})
    tracker.log_param("learning_rate", 0.001)
    tracker.log_params({
        "backbone": "resnet18",
        "epochs": 10,
        "batch_size": 32
    })
    tracker.log_metric("accuracy", 0.95, step=10)
    tracker.log_metrics({
        "train_loss": 0.1,
        "val_loss": 0.2,
        "train_acc": 0.95,
        "val_acc": 0.93
    }, step=epoch)
    tracker.log_training_metrics(
        epoch=10,
        train_loss=0.1,
        train_acc=0.95,
        val_loss=0.2,
        val_acc=0.93,
        learning_rate=0.0001
    )
    tracker.log_artifact(Path("model.pth"), artifact_path="models")
    tracker.log_artifacts(Path("logs/"), artifact_path="training_logs")
    tracker.log_figure(fig, "confusion_matrix.png")
    tracker.log_dict(history, "training_history.json")
    tracker.log_text(summary, "model_summary.txt")
    tracker.log_model(
        model=model,
        artifact_path="model",
        registered_model_name=f"plant_classifier_resnet18_{experiment_name}"
    )
    tracker.set_tag("status", "production")
    tracker.set_tags({
        "best_val_accuracy": "0.9500",
        "best_epoch": "7",
        "framework": "pytorch"
    })
    tracker.log_system_metrics()  # CPU, RAM, Python version, etc.
    tracker.end_run(status="FINISHED")
    runs = tracker.search_runs(
        filter_string="metrics.val_accuracy > 0.90",
        max_results=10,
        order_by=["metrics.val_accuracy DESC"]
    )
    best_run = tracker.get_best_run(
        metric="val_accuracy",
        ascending=False  # Plus haut est mieux
    )

    plain = mlflow.MlflowClient(tracking_uri=mlflow_stack.tracking_uri)
    stored = plain.get_run(best_run["run_id"])
    assert [run["run_id"] for run in runs] == [stored.info.run_id]
    assert stored.info.status == "FINISHED" and stored.info.run_name == "resnet18_experiment"
    assert stored.data.params["backbone"] == "resnet18" and stored.data.params["batch_size"] == "32"
    assert stored.data.metrics["val_accuracy"] == 0.93 and stored.data.metrics["val_acc"] == 0.93
    assert stored.data.tags["framework"] == "pytorch" and "memory_gb" in stored.data.params
    keys = {obj["Key"] for obj in mlflow_stack.s3_client().list_objects_v2(Bucket=mlflow_stack.bucket, Prefix=f"{tracker.experiment_id}/")["Contents"]}
    for name in ("models/model.pth", "training_logs/train.log", "confusion_matrix.png", "training_history.json", "model_summary.txt"):
        assert f"{tracker.experiment_id}/{stored.info.run_id}/artifacts/{name}" in keys, name
    assert capsys.readouterr().out == ""


def test_design_python_api_section(design_folder, mlflow_stack, experiment_name, capsys) -> None:
    seed = MLflowTracker(tracking_uri=mlflow_stack.tracking_uri)
    for name, backbone, accuracy in (("resnet18_exp1", "resnet18", 0.93), ("resnet50_exp1", "resnet50", 0.95), ("mobilenet", "mobilenet_v2", 0.80)):
        with seed.start_run(run_name=name):
            seed.log_params({"backbone": backbone})
            seed.log_metric("val_accuracy", accuracy)

    tracker = MLflowTracker(tracking_uri=mlflow_stack.tracking_uri)

    # Rechercher les meilleurs runs
    best_runs = tracker.search_runs(
        filter_string="metrics.val_accuracy > 0.90",
        max_results=5,
        order_by=["metrics.val_accuracy DESC"]
    )

    for run in best_runs:
        print(f"Run: {run['tags.mlflow.runName']}")
        print(f"Accuracy: {run['metrics.val_accuracy']:.4f}")
        print(f"Backbone: {run['params.backbone']}")
        print()

    assert tracker.experiment_name == experiment_name
    assert capsys.readouterr().out == (
        "Run: resnet50_exp1\nAccuracy: 0.9500\nBackbone: resnet50\n\n"
        "Run: resnet18_exp1\nAccuracy: 0.9300\nBackbone: resnet18\n\n"
    )
