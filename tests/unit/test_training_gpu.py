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
from plantml.training.config import Reporter, TrainConfig
from plantml.training.loop import choose_precision
from plantml.training.run import fit, prepare

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


def test_the_images_live_on_the_gpu_and_batches_come_channels_last(leaves):
    prepared = prepare(TrainConfig(data_dir=leaves, epochs=1, weights="none", image_size=32, device="cuda"))
    images, labels = next(iter(prepared.loaders.train))

    assert prepared.loaders.extra["data_on_device"] is True
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    assert images.is_contiguous(memory_format=torch.channels_last)
    model = prepared.model.to("cuda", memory_format=torch.channels_last)
    with prepared.precision.autocast(prepared.device):
        assert model(images).dtype == torch.bfloat16


def test_the_dataloader_path_still_works_with_pinned_memory(leaves):
    prepared = prepare(TrainConfig(data_dir=leaves, epochs=1, batch_size=8, weights="none", image_size=32,
                                   device="cuda", data_on_device=False, num_workers=2))
    assert prepared.loaders.train.pin_memory is True
    result = fit(prepared, RecordingTracker())
    assert math.isfinite(result.history["train_loss"][0])


def test_a_short_cuda_run_converges_and_is_logged_with_device_cuda(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="gpu test: mlflow is not installed on this runner")
    from plantml.tracking import MLflowTracker

    data = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=80, size=64, seed=1))
    tracker = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment_name="gpu_converges")
    prepared = prepare(TrainConfig(data_dir=data, epochs=8, batch_size=16, weights="none", image_size=64,
                                   device="cuda", register=False, learning_rate=1e-3))
    result = fit(prepared, tracker)

    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    assert result.test.accuracy >= 0.8
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["device"] == "cuda"
    assert run.data.tags["amp"] == "bfloat16" and run.data.tags["data_on_device"] == "true"
    assert "gpu_name" in run.data.params or any(k.startswith("gpu") for k in run.data.params)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,  # without CUDA: the plugin's reason
                    reason=f"gpu test: needs two CUDA devices, this machine has {torch.cuda.device_count()}")
def test_two_gpus_train_one_model_with_nccl(tmp_path):
    """torchrun, two ranks on two GPUs: NCCL, each rank its GPU, images on the GPU, bf16 and channels-last."""
    import json
    import os
    import subprocess
    import sys

    data = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=20, size=48, seed=0))
    for extra in sorted((data / "diseased").glob("*.png"))[14:]:
        extra.unlink()  # 20 + 14 images: 24/5/5, odd shares for the test split
    # rendezvous and NCCL's bootstrap on the loopback interface: tests talk to 127.0.0.1 only
    env = {**os.environ, "NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "plantml", "train", "--no-mlflow", "--device", "cuda", "--data-on-device", "--amp",
                          "--channels-last", "--epochs", "3", "--batch-size", "8", "--image-size", "32", "--weights", "none",
                          "--freeze-backbone", "--unfreeze-epoch", "2", "--data-dir", str(data),
                          "--output-dir", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=600)

    assert out.returncode == 0, out.stderr[-3000:]
    assert "device: cuda x 2 processes (nccl, 16 images per step)" in out.stderr
    assert out.stdout.count("best epoch") == 1  # rank 0 alone prints
    history = json.loads((tmp_path / "out" / "training_history.json").read_text())
    assert history["epoch"] == [1, 2, 3]
    assert all(math.isfinite(v) for v in history["train_loss"] + history["val_loss"])
    assert sum(map(sum, history["confusion_matrix"])) == 5  # the whole test split, each image once


# -- the GPU data path: decoding on the device, streaming, the side stream ---------------------

#: The stated tolerance between the GPU decode and the CPU one, in levels of 255. nvJPEG and
#: libjpeg compute the inverse DCT differently: libjpeg's own choices differ by a mean of 1.1-1.2
#: levels (max 10) on these images (djpeg -dct fast against its default), and torchvision holds
#: nvJPEG to a mean under 2 against libjpeg. With 4:2:0 chroma (what cameras save) libjpeg also
#: interpolates the chroma it upsamples and nvJPEG may not (-nosmooth: mean 0.9-2.1, max 27-61;
#: with -dct fast too: mean 1.5-2.6, max 62), so that case gets a looser bound. A swapped channel
#: order, a flip or a gray image is 13 levels or more (test_training_image_decode.py).
GPU_DECODE_TOLERANCE = {"4:4:4": (2.0, 32), "4:2:0": (4.0, 96)}


@pytest.fixture(scope="module")
def jpeg_leaves(leaves, tmp_path_factory):
    return synth.as_jpeg(leaves, tmp_path_factory.mktemp("jpeg") / "leaves")


@pytest.mark.parametrize("subsampling", GPU_DECODE_TOLERANCE)
@pytest.mark.parametrize("image_size", [32, 48, 224])
def test_the_gpu_decode_gives_the_cpu_decode_within_the_stated_tolerance(leaves, image_size, subsampling, tmp_path):
    from plantml.training.data import scan_image_folder
    from plantml.training.image_decode import decode_on_device, read_encoded

    jpegs = synth.as_jpeg(leaves, tmp_path / "jpeg", subsampling=subsampling)
    encoded = read_encoded([path for path, _ in scan_image_folder(jpegs).samples])
    on_gpu = decode_on_device(encoded, image_size, torch.device("cuda"))
    on_cpu = decode_on_device(encoded, image_size, torch.device("cpu"))
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape
    difference = (on_gpu.cpu().float() - on_cpu.float()).abs()
    mean_levels, max_levels = GPU_DECODE_TOLERANCE[subsampling]
    assert difference.mean() <= mean_levels and difference.max() <= max_levels, \
        (float(difference.mean()), float(difference.max()))


def test_every_format_decodes_on_cuda_in_one_set_cmyk_jpegs_included(leaves, tmp_path):
    """nvJPEG refuses CMYK JPEGs and torchvision has no BMP/TIFF/PPM decoder: one such file in a batch
    must not fail the batch; each falls back to the CPU, and the set decodes as on the CPU."""
    from _images import write_odd_formats

    from plantml.training.image_decode import decode_on_device, read_encoded

    paths = [*write_odd_formats(sorted(leaves.glob("*/*.png"))[0], tmp_path / "odd").values(),
             *sorted(synth.as_jpeg(leaves, tmp_path / "jpeg").glob("*/*.jpg"))[:8]]
    encoded = read_encoded(paths)
    on_gpu = decode_on_device(encoded, 32, torch.device("cuda"))
    on_cpu = decode_on_device(encoded, 32, torch.device("cpu"))
    difference = (on_gpu.cpu().float() - on_cpu.float()).abs()
    mean_levels, max_levels = GPU_DECODE_TOLERANCE["4:2:0"]
    assert difference.mean() <= mean_levels and difference.max() <= max_levels


def test_a_12_megapixel_photo_decodes_on_cuda_at_32_px(tmp_path):
    """A downscale of 125 times: past what CUDA's antialiased kernel takes in one step."""
    from _images import write_large_photo

    from plantml.training.image_decode import decode_on_device, read_encoded

    encoded = read_encoded([write_large_photo(tmp_path / "phone.jpg")])
    on_gpu = decode_on_device(encoded, 32, torch.device("cuda"))
    on_cpu = decode_on_device(encoded, 32, torch.device("cpu"))
    mean_levels, max_levels = GPU_DECODE_TOLERANCE["4:2:0"]
    difference = (on_gpu.cpu().float() - on_cpu.float()).abs()
    assert difference.mean() <= mean_levels and difference.max() <= max_levels


def test_the_side_stream_yields_nothing_for_an_empty_share():
    """Under torchrun a split smaller than the number of ranks leaves a rank with no image of it."""
    from plantml.training.device_data import DeviceLoader
    from plantml.training.distributed import Ranks

    cuda = torch.device("cuda")
    loader = DeviceLoader(torch.zeros((1, 3, 8, 8), dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), batch_size=4,
                          device=cuda, train=False, ranks=Ranks(rank=1, world_size=2, local_rank=1))
    assert loader.prefetch and len(loader) == 0 and list(loader) == []


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_the_side_stream_keeps_the_order_and_the_augmentations_of_a_seed(jpeg_leaves, streamed):
    from plantml.training.data import scan_image_folder
    from plantml.training.device_data import DeviceLoader
    from plantml.training.image_decode import EncodedImages

    scan = scan_image_folder(jpeg_leaves)
    cuda = torch.device("cuda")
    encoded = EncodedImages.read([path for path, _ in scan.samples], 32, cuda)
    images = encoded if streamed else encoded.decode_all()
    labels = torch.as_tensor([label for _, label in scan.samples])
    loaders = [DeviceLoader(images, labels, batch_size=7, device=cuda, train=True, seed=4, channels_last=True,
                            prefetch=prefetch) for prefetch in (True, False)]
    assert loaders[0].prefetch and not loaders[1].prefetch
    for _epoch in range(2):
        batches = [list(loader) for loader in loaders]
        assert len(batches[0]) == len(batches[1]) == 6
        for (a, a_labels), (b, b_labels) in zip(*batches, strict=True):
            assert torch.equal(a_labels, b_labels)
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_a_short_cuda_training_from_a_jpeg_folder_converges(tmp_path, streamed, monkeypatch):
    from plantml.training import run

    if streamed:  # as when the decoded set does not fit in device memory
        monkeypatch.setattr(run, "fits_on_device", lambda *args: False)
    data = synth.as_jpeg(synth.generate(tmp_path / "png", synth.SynthSpec(per_class=80, size=64, seed=1)),
                         tmp_path / "jpeg")
    tracker = RecordingTracker()
    prepared = prepare(TrainConfig(data_dir=data, epochs=8, batch_size=16, weights="none", image_size=64,
                                   device="cuda", register=False, learning_rate=1e-3))
    assert prepared.loaders.extra == {"data_on_device": True, "decode": "gpu", "streamed": streamed}
    result = fit(prepared, tracker)

    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    assert result.test.accuracy >= 0.8
    assert tracker.first("start_run")[1]["tags"]["data_streamed"] == str(streamed).lower()
