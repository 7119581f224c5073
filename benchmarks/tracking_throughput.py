"""Benchmark: metric throughput of MLflowTracker.log_metrics vs a per-call mlflow.log_metric loop.

Against the local stack (PostgreSQL + S3 + MLflow server), in one run, the same 10,000
metric points (100 keys x 100 steps) are logged, ``--repeats`` times side by side:
- through ``MLflowTracker.log_metrics``, one call per step: each call appends to the
  run's journal on local disk (one write per call; the write-ahead journal is always on)
  and returns, and the background sender batches across calls (up to 1000 metrics per
  ``log_batch``);
- through ``mlflow.log_metric``, one call (one HTTP request) per point.

The tracker's time counts until ``end_run`` returns, that is until every point is on the
server (the time the loop itself took, journalling only, is reported beside it as the
*enqueue* rate). Every run is read back to check every point arrived. Prints the medians
of both rates (points/s) and of their ratio (goal: at least 50; enqueue at least
50,000 points/s), and writes them as JSON under benchmarks/results/.
Run: ``python benchmarks/tracking_throughput.py [--keys 100] [--steps 100] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from plantml.stack import start_local_stack
from plantml.tracking import MLflowTracker

RESULTS = Path(__file__).parent / "results" / "tracking_throughput.json"
EXPERIMENT = "benchmark_tracking_throughput"


def points(keys: int, steps: int) -> list[dict[str, float]]:
    """One dict of ``keys`` metric values per step."""
    return [{f"metric_{k:03d}": k + step / 1000 for k in range(keys)} for step in range(steps)]


def time_tracker(stack, data: list[dict[str, float]]) -> tuple[float, float, str]:
    """Seconds until every point is delivered (end_run returned), seconds of the loop alone, run id."""
    tracker = MLflowTracker(tracking_uri=stack.tracking_uri, experiment_name=EXPERIMENT)
    with tracker.start_run(run_name="tracker_log_metrics") as run:
        started = time.perf_counter()
        for step, metrics in enumerate(data):
            tracker.log_metrics(metrics, step=step)
        enqueued = time.perf_counter() - started
    delivered = time.perf_counter() - started
    return delivered, enqueued, run.run_id


def time_fluent_loop(stack, data: list[dict[str, float]]) -> tuple[float, str]:
    import mlflow

    mlflow.set_tracking_uri(stack.tracking_uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="mlflow_log_metric_loop") as run:
        started = time.perf_counter()
        for step, metrics in enumerate(data):
            for key, value in metrics.items():
                mlflow.log_metric(key, value, step=step)
        elapsed = time.perf_counter() - started
    return elapsed, run.info.run_id


def count_points(stack, run_id: str, keys: list[str]) -> int:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.tracking_uri)
    return sum(len(client.get_metric_history(run_id, key)) for key in keys)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side rounds (tracker, then the per-call loop)")
    args = parser.parse_args(argv)
    data = points(args.keys, args.steps)
    total = args.keys * args.steps
    rounds = []
    with start_local_stack() as stack:
        time_tracker(stack, points(args.keys, 10))  # warm-up, not counted: imports, first connections, caches
        for _ in range(args.repeats):
            tracker_s, enqueue_s, tracker_run = time_tracker(stack, data)
            fluent_s, fluent_run = time_fluent_loop(stack, data)
            keys = list(data[0])
            arrived = {"tracker": count_points(stack, tracker_run, keys), "mlflow_log_metric": count_points(stack, fluent_run, keys)}
            rounds.append({"tracker_s": tracker_s, "enqueue_s": enqueue_s, "fluent_s": fluent_s, "arrived": arrived})
            print(f"round: tracker {total / tracker_s:8.1f} points/s (enqueue {total / enqueue_s:9.1f}), "
                  f"per-call loop {total / fluent_s:6.1f} points/s, ratio {fluent_s / tracker_s:5.1f}", flush=True)
    median = statistics.median
    result = {
        "points": total,
        "repeats": args.repeats,
        "tracker_points_per_s": round(median(total / r["tracker_s"] for r in rounds), 1),
        "tracker_enqueue_points_per_s": round(median(total / r["enqueue_s"] for r in rounds), 1),
        "mlflow_log_metric_points_per_s": round(median(total / r["fluent_s"] for r in rounds), 1),
        "ratio": round(median(r["fluent_s"] / r["tracker_s"] for r in rounds), 1),
        "rounds": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rounds],
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    print(f"MLflowTracker.log_metrics : {result['tracker_points_per_s']:>10.1f} points/s (median, all delivered)")
    print(f"  of which the loop        : {result['tracker_enqueue_points_per_s']:>10.1f} points/s (median, journal writes only; goal >= 50,000)")
    print(f"mlflow.log_metric loop    : {result['mlflow_log_metric_points_per_s']:>10.1f} points/s (median)")
    print(f"ratio                     : {result['ratio']:>10.1f} x (median of the rounds' ratios; goal >= 50)")
    lost = [r["arrived"] for r in rounds if r["arrived"] != {"tracker": total, "mlflow_log_metric": total}]
    if lost:
        print(f"WARNING: not every point arrived: {lost}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
