"""Benchmark: time to ready of the whole stack (durable and fast, local and containers) vs the MLflow server alone.

In one run, alternately, N times each:
- the whole local stack, durable (the default: fsync and synchronous commit on), from nothing
  until every service answers;
- the same with ``durable=False`` (what durability costs at start);
- the MLflow server alone, on a fresh database of an already-running PostgreSQL, as plantml runs it (one
  process: :mod:`plantml.stack.mlflow_launch`) and as MLflow's own ``mlflow server`` does (a parent that
  starts uvicorn in a second Python, which imports MLflow again), with the CPU each used until ready;
- the whole containers stack, durable (images present: ``plantml stack build-images`` first);
  ``--no-containers`` leaves it out.

Prints the medians and their ratios (goals: durable local stack <= 1.3 x the server alone;
containers <= 2 x local) and writes them as JSON.
Run: ``python benchmarks/stack_startup.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from plantml.stack import make_stack, start_local_stack
from plantml.stack.host import HostRunner
from plantml.stack.mlflow_server import MLflowServerSpec, mlflow_service
from plantml.stack.ports import free_port

RESULTS = Path(__file__).parent / "results" / "stack_startup.json"


def time_whole_stack(backend: str = "local", durable: bool = True) -> float:
    """From nothing to every service answering (the images already present for containers)."""
    stack = make_stack(backend, durable=durable)
    started = time.perf_counter()
    stack.start()
    elapsed = time.perf_counter() - started
    stack.stop()
    return elapsed


def time_mlflow_alone(base, index: int, workdir: Path, *, own_command: bool = False) -> tuple[float, float]:
    """The server on a fresh database of ``base``'s PostgreSQL (migrations included, as in the whole stack):
    seconds to ready, and the CPU seconds its processes used until then. ``own_command``: MLflow's ``mlflow server``."""
    import psutil

    postgres_port = base.services["postgres"].spec.port
    conn = base.spec.postgres.connect(postgres_port)
    conn.autocommit = True
    database = f"mlflow_bench_{index}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{database}"')
    conn.close()
    folder = workdir / f"mlflow-{index}"
    folder.mkdir()
    spec = mlflow_service(MLflowServerSpec(), folder, free_port(set()), HostRunner.network,
                          replace(base.spec.postgres, database=database), postgres_port,
                          base.spec.s3, base.services["s3"].spec.port)
    if own_command:
        spec = replace(spec, command=("python", "-m", "mlflow", *spec.command[2:]))
    for name, content in spec.files.items():  # what a stack's folder writes before a start (the launcher)
        (folder / name).write_text(content)
    runner = HostRunner()
    runner.open(f"bench-{index}", workdir)
    server = runner.process(spec)
    started = time.perf_counter()
    server.start()
    elapsed = time.perf_counter() - started
    main = psutil.Process(server.pid)
    cpu = sum(sum(process.cpu_times()[:2]) for process in [main, *main.children(recursive=True)])
    server.remove()
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-containers", dest="containers", action="store_false",
                        help="leave the containers backend out (no Docker here)")
    args = parser.parse_args()

    series: dict[str, list[float]] = {"whole_stack_s": [], "whole_stack_fast_s": [], "mlflow_alone_s": [],
                                      "mlflow_own_command_s": [], "mlflow_alone_cpu_s": [], "mlflow_own_command_cpu_s": []}
    if args.containers:
        series["containers_stack_s"] = []
    with tempfile.TemporaryDirectory(prefix="plantml-bench-") as tmp, start_local_stack() as base:
        for index in range(args.repeats):
            series["whole_stack_s"].append(time_whole_stack())
            series["whole_stack_fast_s"].append(time_whole_stack(durable=False))
            for key, own in (("mlflow_alone", False), ("mlflow_own_command", True))[:: 1 if index % 2 == 0 else -1]:
                ready, cpu = time_mlflow_alone(base, 2 * index + own, Path(tmp), own_command=own)
                series[f"{key}_s"].append(ready)
                series[f"{key}_cpu_s"].append(cpu)
            if args.containers:
                series["containers_stack_s"].append(time_whole_stack("containers"))
            print(f"round {index + 1}: " + ", ".join(f"{name} {values[-1]:.2f}" for name, values in series.items()), flush=True)

    medians = {name.removesuffix("_s") + "_median_s": statistics.median(values) for name, values in series.items()}
    result: dict[str, object] = {"repeats": args.repeats, **series, **medians}
    result["ratio"] = medians["whole_stack_median_s"] / medians["mlflow_alone_median_s"]
    result["durable_vs_fast_ratio"] = medians["whole_stack_median_s"] / medians["whole_stack_fast_median_s"]
    result["one_process_vs_mlflow_server_ratio"] = medians["mlflow_alone_median_s"] / medians["mlflow_own_command_median_s"]
    result["one_process_vs_mlflow_server_cpu_ratio"] = (medians["mlflow_alone_cpu_median_s"]
                                                        / medians["mlflow_own_command_cpu_median_s"])
    for name, value in medians.items():
        print(f"median {name.removesuffix('_median_s').replace('_', ' ')}: {value:.2f} s")
    print(f"ratio durable whole stack / MLflow alone: {result['ratio']:.2f} (goal <= 1.3)")
    print(f"ratio durable / fast whole stack: {result['durable_vs_fast_ratio']:.2f} (what durability costs at start)")
    print(f"ratio one-process server / mlflow server: ready {result['one_process_vs_mlflow_server_ratio']:.2f}, "
          f"CPU {result['one_process_vs_mlflow_server_cpu_ratio']:.2f}")
    if args.containers:
        result["containers_vs_local_ratio"] = medians["containers_stack_median_s"] / medians["whole_stack_median_s"]
        print(f"ratio containers/local: {result['containers_vs_local_ratio']:.2f} (goal <= 2)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
