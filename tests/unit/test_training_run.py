"""A whole run against a recording tracker: what is logged, freezing, early stopping, endings."""

from __future__ import annotations

import json
import shutil
import time
from types import SimpleNamespace

import pytest
import torch

from plantml.errors import UsageError
from plantml.training import synth
from plantml.training.config import NullTracker, Reporter, TrainConfig
from plantml.training.run import fit, prepare, train

DESIGN_PARAMS = {
    "backbone", "epochs", "batch_size", "learning_rate", "device", "freeze_backbone", "unfreeze_epoch",
    "early_stopping_patience", "optimizer", "scheduler", "loss_function", "num_classes", "train_size", "val_size",
    "test_size", "total_parameters", "trainable_parameters",
}


class RecordingTracker:
    """Has the MLflowTracker API; records every call instead of sending it."""

    enabled = True

    def __init__(self):
        self.calls = []
        self.run_id = None

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "start_run":
                self.run_id = "run-1"
            if name == "log_model":
                return SimpleNamespace(registered_model_version=1)
            return None
        return record

    def named(self, name):
        return [(args, kwargs) for called, args, kwargs in self.calls if called == name]


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=12, size=32, seed=0))


def tiny(leaves, **overrides):
    base = dict(data_dir=leaves, epochs=2, batch_size=8, image_size=32, weights="none", num_workers=0, seed=1)
    return TrainConfig(**{**base, **overrides})


def test_params_are_the_design_list_plus_seed_weights_image_size_skipped_images_and_processes(leaves):
    tracker = RecordingTracker()
    train(tiny(leaves), tracker)

    [(args, _)] = tracker.named("log_params")
    params = args[0]
    assert set(params) == DESIGN_PARAMS | {"weight_decay", "val_split", "test_split", "seed", "weights", "image_size",
                                           "skipped_images", "world_size", "global_batch_size"}
    assert (params["world_size"], params["batch_size"], params["global_batch_size"]) == (1, 8, 8)
    assert params["skipped_images"] == 0
    assert (params["train_size"], params["val_size"], params["test_size"]) == (16, 4, 4)
    assert params["optimizer"] == "AdamW" and params["scheduler"] == "CosineAnnealingLR"
    assert params["loss_function"] == "CrossEntropyLoss" and params["num_classes"] == 2
    assert params["device"] == "cpu" and params["weights"] == "none" and params["image_size"] == 32


def test_every_training_choice_that_changes_the_result_is_a_param(leaves):
    tracker = RecordingTracker()
    train(tiny(leaves, epochs=1, weight_decay=0.25, val_split=0.2, test_split=0.25), tracker)

    params = tracker.named("log_params")[0][0][0]
    assert (params["weight_decay"], params["val_split"], params["test_split"]) == (0.25, 0.2, 0.25)


def test_every_epoch_logs_its_five_metrics_and_the_test_metrics_come_last(leaves):
    tracker = RecordingTracker()
    train(tiny(leaves, epochs=3), tracker)

    epochs = tracker.named("log_training_metrics")
    assert [kwargs["epoch"] for _, kwargs in epochs] == [1, 2, 3]
    assert set(epochs[0][1]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "learning_rate"}
    lrs = [kwargs["learning_rate"] for _, kwargs in epochs]
    assert lrs[0] == pytest.approx(1e-3) and lrs[0] > lrs[1] > lrs[2]  # cosine schedule
    [(args, _)] = tracker.named("log_metrics")
    assert set(args[0]) == {"test_loss", "test_accuracy", "best_val_loss", "best_val_accuracy"}


def test_the_kept_epochs_validation_metrics_are_logged_when_it_is_not_the_last(tmp_path):
    # both classes hold the same images: the validation loss stalls and the run stops after a worse epoch
    data = tmp_path / "same"
    synth.generate(tmp_path / "src", synth.SynthSpec(per_class=12, size=32, seed=0))
    shutil.copytree(tmp_path / "src" / "healthy", data / "a")
    shutil.copytree(tmp_path / "src" / "healthy", data / "b")
    tracker = RecordingTracker()

    result = train(tiny(data, epochs=10, early_stopping_patience=2), tracker)

    last = tracker.named("log_training_metrics")[-1][1]
    [(args, _)] = tracker.named("log_metrics")
    assert result.best_epoch < last["epoch"] and last["val_loss"] != result.best_val_loss
    assert args[0]["best_val_loss"] == result.best_val_loss == min(result.history["val_loss"])
    assert args[0]["best_val_accuracy"] == result.history["val_accuracy"][result.best_epoch - 1]


def test_artifacts_figures_model_and_tags_are_recorded(leaves):
    tracker = RecordingTracker()
    result = train(tiny(leaves), tracker)

    assert tracker.named("log_dict")[0][0][1] == "training/training_history.json"
    [(args, kwargs)] = tracker.named("log_artifact")
    assert args[0].name == "best_model.pth" and kwargs["artifact_path"] == "models"
    assert [args[1] for args, _ in tracker.named("log_figure")] == ["figures/learning_curves.png", "figures/confusion_matrix.png"]
    [(_, model_kwargs)] = tracker.named("log_model")
    assert model_kwargs["registered_model_name"] == "resnet18_plant_classifier"
    assert model_kwargs["input_example"].shape == (2, 3, 32, 32)
    signature = model_kwargs["signature"].to_dict()  # any batch and image size, three float32 channels in
    assert (json.loads(signature["inputs"]), json.loads(signature["outputs"])) == (
        [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3, -1, -1]}}],
        [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 2]}}])
    start_tags = tracker.named("start_run")[0][1]["tags"]
    assert start_tags["framework"] == "pytorch" and start_tags["dataset"] == "leaves"
    assert start_tags["dataset_synthetic"] == "true" and len(start_tags["dataset_hash"]) == 64
    end_tags = {k: v for args, _ in tracker.named("set_tags") for k, v in args[0].items()}
    assert end_tags["best_epoch"] == str(result.best_epoch)
    assert end_tags["best_val_accuracy"] == f"{result.best_val_accuracy:.4f}"
    assert tracker.named("end_run") == [((), {"status": "FINISHED"})]
    assert result.model_version == "1"


def test_a_relative_data_dir_is_recorded_as_the_absolute_folder(leaves, monkeypatch):
    monkeypatch.chdir(leaves.parent)
    tracker = RecordingTracker()

    train(tiny("leaves", epochs=1), tracker)

    tags = tracker.named("start_run")[0][1]["tags"]
    assert tags["dataset_path"] == str(leaves.resolve())


@pytest.mark.parametrize("typed, working_folder", [(".", "."), ("..", "healthy")])
def test_a_data_dir_typed_as_dot_is_named_after_its_folder(leaves, monkeypatch, typed, working_folder):
    monkeypatch.chdir(leaves / working_folder)
    tracker = RecordingTracker()

    train(tiny(typed, epochs=1), tracker)

    assert tracker.named("start_run")[0][1]["tags"]["dataset"] == "leaves"
    [(args, _)] = tracker.named("log_input")
    assert args[0] == "leaves"  # the data set's name: MLflow refuses an empty one, once the run exists


def test_same_seed_repeats_the_run_exactly_on_cpu(leaves):
    first = train(tiny(leaves)).history
    second = train(tiny(leaves)).history

    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss"):
        assert first[key] == second[key]


def test_frozen_backbone_trains_only_the_head_until_the_unfreeze_epoch(leaves):
    seen = []

    class Watch(Reporter):
        def __init__(self, model):
            self.model = model

        def batches(self, iterable, *, epoch, epochs, total):
            seen.append((epoch, self.model.conv1.weight.requires_grad, self.model.fc.weight.requires_grad,
                         self.model.conv1.weight.detach().clone()))
            return iterable

    tracker = RecordingTracker()
    prepared = prepare(tiny(leaves, epochs=3, freeze_backbone=True, unfreeze_epoch=3))
    fit(prepared, tracker, Watch(prepared.model))

    assert [(e, conv, fc) for e, conv, fc, _ in seen] == [(1, False, True), (2, False, True), (3, True, True)]
    assert torch.equal(seen[0][3], seen[2][3])  # the backbone did not move while frozen
    params = tracker.named("log_params")[0][0][0]
    assert params["trainable_parameters"] == 2 * 512 + 2  # counted at the start: the head only
    assert params["freeze_backbone"] is True and params["unfreeze_epoch"] == 3


def test_a_frozen_backbone_keeps_its_batch_norm_statistics_until_it_is_unfrozen(leaves):
    prepared = prepare(tiny(leaves, epochs=3, freeze_backbone=True, unfreeze_epoch=3, early_stopping_patience=5))
    frozen = {k: v.clone() for k, v in prepared.model.state_dict().items() if not k.startswith("fc.")}
    after_each_epoch = []

    class Watch(Reporter):
        def epoch_end(self, record):
            after_each_epoch.append(prepared.model.bn1.running_mean.detach().clone())

    fit(prepared, RecordingTracker(), Watch())

    assert torch.equal(after_each_epoch[1], frozen["bn1.running_mean"])  # two frozen epochs moved nothing
    assert not torch.equal(after_each_epoch[2], frozen["bn1.running_mean"])  # unfrozen, the statistics train


def test_a_run_frozen_throughout_keeps_the_whole_backbone_it_started_from(leaves):
    prepared = prepare(tiny(leaves, freeze_backbone=True))
    frozen = {k: v.clone() for k, v in prepared.model.state_dict().items() if not k.startswith("fc.")}

    fit(prepared, RecordingTracker())

    kept = prepared.model.state_dict()  # the best epoch's weights, as registered
    assert [k for k, v in frozen.items() if not torch.equal(v, kept[k])] == []


def test_early_stopping_when_validation_stops_improving(tmp_path):
    # both classes hold the same images: nothing can be learnt, the validation loss stalls
    data = tmp_path / "same"
    synth.generate(tmp_path / "src", synth.SynthSpec(per_class=12, size=32, seed=0))
    shutil.copytree(tmp_path / "src" / "healthy", data / "a")
    shutil.copytree(tmp_path / "src" / "healthy", data / "b")

    result = train(tiny(data, epochs=10, early_stopping_patience=2))

    epochs_run = len(result.history["epoch"])
    assert result.stopped_early and epochs_run < 10
    assert epochs_run == result.best_epoch + 2
    assert result.best_val_loss == min(result.history["val_loss"])


def test_ctrl_c_ends_the_run_killed_and_propagates(leaves):
    class Interrupt(Reporter):
        def batches(self, iterable, **_):
            raise KeyboardInterrupt

    tracker = RecordingTracker()
    with pytest.raises(KeyboardInterrupt) as raised:
        train(tiny(leaves), tracker, Interrupt())
    assert tracker.named("end_run") == [((), {"status": "KILLED", "error": raised.value})]


def test_an_error_during_training_ends_the_run_failed(leaves):
    class Boom(Reporter):
        def epoch_end(self, record):
            raise RuntimeError("boom")

    tracker = RecordingTracker()
    with pytest.raises(RuntimeError, match="boom") as raised:
        train(tiny(leaves), tracker, Boom())
    assert tracker.named("end_run") == [((), {"status": "FAILED", "error": raised.value})]  # recorded as error tags


@pytest.mark.parametrize("overrides, message", [
    ({"unfreeze_epoch": 5, "freeze_backbone": True}, "--unfreeze-epoch 5"),
    ({"unfreeze_epoch": 1}, "needs --freeze-backbone"),
    ({"device": "cuda"} if not torch.cuda.is_available() else {"device": "tpu"}, "--device"),
    ({"backbone": "vgg"}, "backbone 'vgg'"),
])
def test_bad_inputs_fail_in_prepare_before_any_run(leaves, overrides, message):
    with pytest.raises(UsageError, match=message):
        prepare(tiny(leaves, **overrides))


def test_no_mlflow_tracker_accepts_every_call():
    tracker = NullTracker()
    assert tracker.start_run(run_name="x") is None and tracker.log_model(object()) is None


def test_output_dir_keeps_checkpoint_and_history(leaves, tmp_path):
    result = train(tiny(leaves, output_dir=tmp_path / "out"))

    checkpoint = torch.load(tmp_path / "out" / "best_model.pth", weights_only=True)
    assert checkpoint["epoch"] == result.best_epoch and checkpoint["classes"] == ["diseased", "healthy"]
    assert (tmp_path / "out" / "training_history.json").is_file()


def test_the_model_s_class_names_are_sendable_text_even_for_folders_named_in_latin_1() -> None:
    import json

    from plantml.training.data import preprocessing

    classes = preprocessing(("pl\udce9nts", "healthy"), 32)["classes"]  # a folder named in Latin-1, as Python reads it
    assert classes == ["pl%E9nts", "healthy"]  # as the run's tags and the confusion matrix show it
    json.dumps(classes).encode("utf-8")


def test_an_error_after_an_earlier_runs_interruption_was_caught_is_that_error_not_the_old_stop(leaves):
    """Was: a run interrupted by SIGTERM whose caller caught the interruption and went on (a notebook, a
    scheduler) left it behind; a later training's RuntimeError was then reported KILLED and re-raised as
    that old "interrupted by SIGTERM" (a KeyboardInterrupt: it ended a pytest worker's session in CI)."""
    import signal

    from plantml.errors import Interrupted
    from plantml.tracking import signals as handling

    class Boom(Reporter):
        def epoch_end(self, record):
            raise RuntimeError("boom")

    handling.install()  # an earlier run with handle_signals=True
    try:
        with pytest.raises(Interrupted):
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.01)
    finally:
        handling.uninstall()  # that run ended; its caller goes on
    try:
        tracker = RecordingTracker()
        with pytest.raises(RuntimeError, match="boom") as raised:
            train(tiny(leaves), tracker, Boom())
        assert tracker.named("end_run") == [((), {"status": "FAILED", "error": raised.value})]
    finally:
        handling.reset()
