"""Training on CUDA: mixed precision, channels-last, the device param, GPU facts (``pytest -m gpu``).

These need only torch and torchvision (no tracking stack, no mlflow), so they run on a bare
CUDA runner; without CUDA the plugin skips them with the reason.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from plantml.training import synth
from plantml.training.loop import choose_precision
from plantml.training.run import Reporter, TrainConfig, fit, prepare

pytestmark = pytest.mark.gpu


class RecordingTracker:
    enabled = False  # no log_model: that needs mlflow

    def __init__(self):
        self.calls = []
        self.run_id = "run-1"

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return SimpleNamespace(registered_model_version=None)
        return record

    def first(self, name):
        return next((args, kwargs) for called, args, kwargs in self.calls if called == name)


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=20, size=48, seed=0))


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0"])
def test_cuda_training_uses_mixed_precision_and_channels_last(leaves, backbone):
    seen = {}

    class Watch(Reporter):
        def batches(self, iterable, **_):
            for images, labels in iterable:
                seen.setdefault("param_device", next(prepared.model.parameters()).device.type)
                yield images, labels

    tracker = RecordingTracker()
    prepared = prepare(TrainConfig(backbone=backbone, data_dir=leaves, epochs=2, batch_size=8, weights="none",
                                   image_size=32, device="cuda", num_workers=2))
    result = fit(prepared, tracker, Watch())

    params = tracker.first("log_params")[0][0]
    tags = tracker.first("start_run")[1]["tags"]
    assert params["device"] == "cuda" and seen["param_device"] == "cuda"
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert tags["amp"] == expected and tags["channels_last"] == "true" and tags["device_name"]
    assert all(math.isfinite(v) for v in result.history["train_loss"] + result.history["val_loss"])
    assert 0 <= result.test.accuracy <= 1


def test_default_device_is_cuda_with_224px_images(leaves):
    prepared = prepare(TrainConfig(data_dir=leaves, epochs=1, weights="none"))

    assert prepared.device.type == "cuda" and prepared.image_size == 224
    assert prepared.params()["device"] == "cuda"


def test_no_amp_runs_in_full_precision():
    precision = choose_precision(torch.device("cuda"), amp=False, channels_last=False)

    assert precision.autocast_dtype is None and not precision.channels_last


def test_gpu_facts_are_in_the_system_metrics():
    from plantml.tracking.system import system_facts

    facts = system_facts()

    assert facts["cuda_available"] is True
    assert facts["gpu_name"] == torch.cuda.get_device_name(0) and facts["gpu_memory_gb"] > 0
