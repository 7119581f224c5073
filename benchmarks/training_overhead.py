"""Tracking overhead on training throughput: resnet18 epochs with MLflow tracking vs ``--no-mlflow``.

In one process, against a local tracking stack (PostgreSQL, S3, MLflow server), runs
alternate tracked / untracked (ABBA order, so drift on a busy machine hits both
sides alike) on the synthetic leaf set. Throughput counts the training images of
every epoch over the wall time from the first batch to the end of the last epoch,
which includes the per-epoch metric logging; the one-off costs of a run (creating
it, logging the model) are reported separately. Prints both rates and their ratio,
and writes them as JSON under ``benchmarks/results/``. Goal: ratio >= 0.98.

    python benchmarks/training_overhead.py [--rounds 2] [--epochs 3] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

GOAL = 0.98
RESULTS = Path(__file__).resolve().parent / "results"


def timed_run(config, tracker):
    """Train once; return (train images per second over the epochs, run wall seconds)."""
    from plantml.training.config import Reporter
    from plantml.training.run import fit, prepare

    class Clock(Reporter):
        first = None
        last = None
        images = 0

        def batches(self, iterable, *, epoch, epochs, total):
            if self.first is None:
                self.first = time.perf_counter()
            return iterable

        def epoch_end(self, record):
            self.last = time.perf_counter()

    clock = Clock()
    started = time.perf_counter()
    prepared = prepare(config)
    result = fit(prepared, tracker, clock)
    wall = time.perf_counter() - started
    images = len(prepared.loaders.split.train) * len(result.history["epoch"])
    return images / (clock.last - clock.first), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each: 2 tracked + 2 untracked runs)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    from plantml.stack import make_stack
    from plantml.tracking import MLflowTracker
    from plantml.training.config import NullTracker, TrainConfig

    config = TrainConfig(backbone="resnet18", epochs=args.epochs, image_size=args.image_size, weights="none",
                         early_stopping_patience=args.epochs + 1, register=False)
    rates = {"tracked": [], "untracked": []}
    walls = {"tracked": [], "untracked": []}
    with make_stack("local", "direct").start() as stack:
        experiment = f"benchmark_training_overhead_{int(time.time())}"

        def tracker_for(kind):
            if kind == "untracked":
                return NullTracker()
            return MLflowTracker(tracking_uri=stack.tracking_uri, experiment_name=experiment,
                                 s3_endpoint=stack.s3_endpoint, aws_access_key=stack.aws_access_key,
                                 aws_secret_key=stack.aws_secret_key)

        timed_run(config, NullTracker())  # warm-up: data set cache, allocator, thread pools
        for _ in range(args.rounds):
            for kind in ("tracked", "untracked", "untracked", "tracked"):
                rate, wall = timed_run(config, tracker_for(kind))
                rates[kind].append(rate)
                walls[kind].append(wall)
                print(f"{kind:>9}: {rate:7.1f} images/s over the epochs, run {wall:5.1f}s", flush=True)

    tracked, untracked = statistics.median(rates["tracked"]), statistics.median(rates["untracked"])
    ratio = tracked / untracked
    report = {
        "benchmark": "training_overhead",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "config": {"backbone": "resnet18", "epochs": args.epochs, "image_size": args.image_size,
                   "rounds": args.rounds, "batch_size": config.batch_size},
        "images_per_second": {"tracked": tracked, "untracked": untracked},
        "runs": {"rates": rates, "wall_seconds": walls},
        "ratio": ratio,
        "goal": GOAL,
        "passed": ratio >= GOAL,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "training_overhead.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"tracked {tracked:.1f} images/s, no-mlflow {untracked:.1f} images/s, ratio {ratio:.3f} "
          f"(goal >= {GOAL}) -> {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
