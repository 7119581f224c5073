"""Distributed training throughput: images per second with 1 process and with N, side by side in one run.

Each measurement is one ``torchrun --standalone --nproc_per_node K`` job that runs this file
as its worker: :func:`plantml.training.run.prepare` and :func:`~plantml.training.run.fit`,
untracked, on the synthetic leaf set. Rank 0 counts the training images of every epoch
after the first (a warm-up: allocator, thread pools, gloo's first connections) over their
wall time, which includes DDP's gradient all-reduce, the evaluation of the validation split
and the per-epoch metric all-reduce. Jobs alternate 1, N, N, 1 (ABBA), so drift on a busy
machine hits both sides alike; the report is the median of each side.

``--batch-size`` is per process, as torchrun users run it: N processes step on N times as
many images at once. torchrun gives each of N > 1 processes one CPU thread
(``OMP_NUM_THREADS=1``) and a single process all of them, so on a CPU both sides use every
core; ``--threads T`` gives every process of both sides T threads instead. Writes
``benchmarks/results/ddp_scaling.json`` (or ``--output``).

    python benchmarks/ddp_scaling.py [--nproc 2] [--rounds 2] [--epochs 4] [--image-size 64] [--device cpu] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def worker(args: argparse.Namespace) -> None:
    """One rank of a measured job; rank 0 writes the rate to ``args.out``."""
    import torch

    from plantml.training import distributed
    from plantml.training.config import Reporter, TrainConfig
    from plantml.training.run import fit, prepare

    class Clock(Reporter):
        def __init__(self) -> None:
            self.epoch_started: dict[int, float] = {}
            self.last_end = 0.0

        def batches(self, iterable, *, epoch, epochs, total):
            self.epoch_started[epoch] = time.perf_counter()
            return iterable

        def epoch_end(self, record):
            self.last_end = time.perf_counter()

    config = TrainConfig(backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
                         weights="none", device=args.device, num_workers=0, early_stopping_patience=args.epochs + 1,
                         register=False)
    with distributed.session(args.device) as ranks:
        prepared = prepare(config, ranks)
        clock = Clock()
        fit(prepared, None, clock)
    if ranks.is_main:
        images = len(prepared.loaders.split.train) * (args.epochs - 1)
        seconds = clock.last_end - clock.epoch_started[2]
        Path(args.out).write_text(json.dumps({"images_per_second": images / seconds, "threads": torch.get_num_threads(),
                                              "device": prepared.device.type}))


def measure(nproc: int, args: argparse.Namespace) -> dict:
    """Run one torchrun job of ``nproc`` processes; what its rank 0 measured."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rate.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   __file__, "--worker", "--out", str(out), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                   "--image-size", str(args.image_size), "--backbone", args.backbone, "--device", args.device]
        # gloo, and NCCL's bootstrap, on the loopback interface: benchmarks talk to 127.0.0.1 only
        env = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", **os.environ}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"torchrun with {nproc} process(es) failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the distributed side")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each: 2 jobs of 1 process, 2 of N)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per job, the first one a warm-up")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step and process")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every process [default: torchrun's]")
    parser.add_argument("--output", type=Path, default=RESULTS / "ddp_scaling.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (the first is a warm-up)")

    runs: dict[int, list[dict]] = {1: [], args.nproc: []}
    for _ in range(args.rounds):
        for nproc in (1, args.nproc, args.nproc, 1):
            measured = measure(nproc, args)
            runs[nproc].append(measured)
            print(f"{nproc} process(es): {measured['images_per_second']:7.1f} images/s "
                  f"({measured['threads']} thread(s) each, {measured['device']})", flush=True)

    one = statistics.median(r["images_per_second"] for r in runs[1])
    many = statistics.median(r["images_per_second"] for r in runs[args.nproc])
    report = {
        "benchmark": "ddp_scaling",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "config": {k: getattr(args, k) for k in ("nproc", "rounds", "epochs", "batch_size", "image_size", "backbone", "device", "threads")},
        "images_per_second": {"1": one, str(args.nproc): many},
        "runs": {str(k): v for k, v in runs.items()},
        "speedup": many / one,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"1 process {one:.1f} images/s, {args.nproc} processes {many:.1f} images/s: x{many / one:.2f} -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
