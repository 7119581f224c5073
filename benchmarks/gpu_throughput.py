"""Benchmark: plantml's training loop, tracking included, against a bare PyTorch loop on CUDA.

For each backbone, in one run and alternating epoch by epoch, on the same data:
- **bare**: the minimal step (zero_grad, forward, loss, backward, optimizer step) with
  bf16 autocast and channels_last, nothing else, reading plantml's device-resident batches;
- **plantml**: ``plantml.training.loop.train_one_epoch`` (loss and accuracy accumulated on
  the device, read once per epoch), the learning-rate scheduler, and the epoch's metrics
  logged through ``MLflowTracker`` to a local sqlite store;
- **pure**: the bare step on one fixed batch already on the device, as many steps as an
  epoch has: pure compute, the limit a data path can approach;
- **jpeg**: plantml's loop fed from the same set written as JPEG files, kept encoded in
  host memory and decoded on the GPU batch by batch every epoch (the streamed path: the
  decoding is paid in every epoch, not once).

Prints images per second (median of the timed epochs) and the ratios plantml/bare,
plantml/pure and jpeg/pure per backbone, and writes them as JSON.

Needs torch and torchvision; MLflow (``mlflow-skinny`` and its few dependencies, carried
as wheels on a machine without network) for the tracking. Without MLflow it says so and
measures the loop without tracking.

Run: ``python benchmarks/gpu_throughput.py`` (``--device cpu --image-size 32 --tile 1`` for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing plantml

from plantml.training import synth  # noqa: E402
from plantml.training.data import scan_image_folder  # noqa: E402
from plantml.training.device_data import DeviceLoader, decode_images  # noqa: E402
from plantml.training.image_decode import EncodedImages, read_encoded  # noqa: E402
from plantml.training.loop import Precision, choose_precision, train_one_epoch  # noqa: E402
from plantml.training.models import WeightsChoice, build_model  # noqa: E402

BACKBONES = ("resnet18", "resnet50", "efficientnet_b0", "mobilenet_v2")
RESULTS = ROOT / "benchmarks" / "results" / "gpu_throughput.json"


def make_tracker(workdir: Path, backbone: str):
    """An MLflowTracker on a local sqlite store, or None (with the reason) when MLflow is missing."""
    try:
        import mlflow  # noqa: F401 - only to say clearly when it is missing

        from plantml.tracking import MLflowTracker
    except Exception as exc:  # noqa: BLE001 - ImportError, or a carried package that does not fit
        return None, f"mlflow is not importable here ({type(exc).__name__}: {exc}); carry mlflow-skinny and its dependencies as wheels"
    tracker = MLflowTracker(tracking_uri=f"sqlite:///{workdir}/{backbone}.db", experiment_name="gpu_throughput")
    tracker.start_run(run_name=f"gpu_throughput_{backbone}")
    tracker.log_params({"backbone": backbone, "benchmark": "gpu_throughput"})
    return tracker, "MLflowTracker -> sqlite"


class Contender:
    """One model, optimizer and loader; both contenders start from the same weights."""

    def __init__(self, model: nn.Module, loader: DeviceLoader, precision: Precision, lr: float) -> None:
        self.model = model
        self.loader = loader
        self.precision = precision
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.criterion = nn.CrossEntropyLoss()


def bare_epoch(c: Contender, device: torch.device) -> None:
    """The minimal training pass: what a hand-written loop does."""
    c.model.train()
    for images, targets in c.loader:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=c.precision.autocast_dtype is not None):
            loss = c.criterion(c.model(images), targets)
        c.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        c.optimizer.step()


def pure_epoch(c: Contender, device: torch.device, steps: int, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The bare step on one batch already on the device, ``steps`` times: no data path at all."""
    images, targets = batch
    c.model.train()
    for _ in range(steps):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=c.precision.autocast_dtype is not None):
            loss = c.criterion(c.model(images), targets)
        c.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        c.optimizer.step()


def plantml_epoch(c: Contender, device: torch.device, scheduler, tracker, epoch: int) -> None:
    """plantml's loop: stats on the device, one read per epoch, scheduler, metrics tracked."""
    stats = train_one_epoch(c.model, c.loader, c.criterion, c.optimizer, device, c.precision)
    scheduler.step()
    if tracker is not None:
        tracker.log_metrics({"train_loss": stats.loss, "train_accuracy": stats.accuracy,
                             "learning_rate": scheduler.get_last_lr()[0]}, step=epoch)


def timed(device: torch.device, fn, *args) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_backbone(backbone: str, images: torch.Tensor, labels: torch.Tensor, jpegs: EncodedImages, args,
                   device: torch.device, workdir: Path) -> dict:
    precision = choose_precision(device, amp=None if device.type == "cuda" else False, channels_last=None)
    torch.manual_seed(0)
    template = build_model(backbone, 2, WeightsChoice("none"))
    contenders = {}
    for name in ("bare", "plantml", "pure", "jpeg"):
        model = build_model(backbone, 2, WeightsChoice("none"))
        model.load_state_dict(template.state_dict())
        model = model.to(device)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if args.compile and name in ("plantml", "jpeg"):
            model = torch.compile(model)  # what plantml train --compile does
        loader = DeviceLoader(jpegs if name == "jpeg" else images, labels, batch_size=args.batch_size, device=device,
                              train=True, seed=1, channels_last=precision.channels_last)
        contenders[name] = Contender(model, loader, precision, args.learning_rate)
    fixed = next(iter(contenders["pure"].loader))  # one batch, prepared once, reused for every step
    steps = len(contenders["pure"].loader)
    schedulers = {name: torch.optim.lr_scheduler.CosineAnnealingLR(contenders[name].optimizer, T_max=args.epochs + 1)
                  for name in ("plantml", "jpeg")}
    tracker, tracking = make_tracker(workdir, backbone)
    epochs = {
        "bare": lambda epoch: bare_epoch(contenders["bare"], device),
        "plantml": lambda epoch: plantml_epoch(contenders["plantml"], device, schedulers["plantml"], tracker, epoch),
        "pure": lambda epoch: pure_epoch(contenders["pure"], device, steps, fixed),
        "jpeg": lambda epoch: plantml_epoch(contenders["jpeg"], device, schedulers["jpeg"], None, epoch),
    }
    try:
        for run_epoch in epochs.values():  # warm-up: cudnn autotuning, allocator, lazy init
            run_epoch(0)
        times: dict[str, list[float]] = {name: [] for name in epochs}
        for epoch in range(1, args.epochs + 1):
            for name, run_epoch in epochs.items():
                times[name].append(timed(device, run_epoch, epoch))
    finally:
        if tracker is not None:
            tracker.end_run("FINISHED")
    n = len(labels)
    # pure runs `steps` full batches: more images than an epoch whose last batch is short
    counts = {name: n for name in times} | {"pure": steps * len(fixed[1])}
    rates = {name: counts[name] / statistics.median(values) for name, values in times.items()}
    return {
        "backbone": backbone,
        "images_per_epoch": n,
        **{f"{name}_images_per_s": rate for name, rate in rates.items()},
        "ratio": rates["plantml"] / rates["bare"],
        "plantml_over_pure": rates["plantml"] / rates["pure"],
        "jpeg_over_pure": rates["jpeg"] / rates["pure"],
        "epoch_seconds": times,
        "tracking": tracking,
        "autocast": str(precision.autocast_dtype),
        "channels_last": precision.channels_last,
        "compile": args.compile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per contender (after one warm-up)")
    parser.add_argument("--tile", type=int, default=12, help="times the 400-image synthetic set is repeated per epoch")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--compile", action="store_true", help="torch.compile plantml's model (the bare loop stays eager)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_throughput: no CUDA device here (torch.cuda.is_available() is False); use --device cpu for a smoke test")
    torch.backends.cudnn.benchmark = True
    data_dir = synth.ensure_cached(synth.SynthSpec(size=args.image_size))
    samples = scan_image_folder(data_dir).samples
    images, labels = decode_images(samples, args.image_size)
    images, labels = images.repeat(args.tile, 1, 1, 1), labels.repeat(args.tile)
    jpeg_dir = synth.as_jpeg(data_dir, Path(tempfile.mkdtemp(prefix="plantml-gpu-bench-jpeg-")))
    files = read_encoded([path for path, _ in scan_image_folder(jpeg_dir).samples])
    jpegs = EncodedImages(files * args.tile, args.image_size, device)  # the order of the tiled decoded set
    started = time.perf_counter()
    jpegs.decode_all()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    decode_rate = len(jpegs) / (time.perf_counter() - started)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {gpu}; torch {torch.__version__}; {len(labels)} images of {args.image_size} px per epoch, "
          f"batch {args.batch_size}; JPEG decode on {device.type}: {decode_rate:.0f} img/s "
          f"({jpegs.nbytes / len(jpegs) / 1024:.0f} KiB per file)", flush=True)

    results = []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="plantml-gpu-bench-") as tmp:
        for backbone in args.backbones:
            result = bench_backbone(backbone, images, labels, jpegs, args, device, Path(tmp))
            results.append(result)
            # written after each backbone: a run stopped at a time limit keeps the backbones it finished
            args.output.write_text(json.dumps({"device": gpu, "torch": torch.__version__, "jpeg_decode_images_per_s": decode_rate,
                                               "results": results}, indent=2))
            print(f"{backbone:16s} bare {result['bare_images_per_s']:8.0f}  plantml {result['plantml_images_per_s']:8.0f}  "
                  f"pure {result['pure_images_per_s']:8.0f}  jpeg {result['jpeg_images_per_s']:8.0f} img/s   "
                  f"plantml/bare {result['ratio']:.3f}  plantml/pure {result['plantml_over_pure']:.3f}  "
                  f"jpeg/pure {result['jpeg_over_pure']:.3f}   (tracking: {result['tracking']})", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
