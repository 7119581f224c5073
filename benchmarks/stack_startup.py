"""Benchmark: time to ready of the whole stack, local and containers, vs the MLflow server alone.

In one run, alternately, N times each:
- the whole local stack (PostgreSQL + S3 + MLflow, from nothing) until every service answers;
- the MLflow server alone, on a fresh database of an already-running PostgreSQL;
- the whole containers stack (images present: ``plantml stack build-images`` first),
  side by side with the local one (``--no-containers`` leaves it out).

Prints the medians and their ratios (goals: whole local stack <= 1.3 x the server alone;
containers <= 2 x local) and writes them as JSON.
Run: ``python benchmarks/stack_startup.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from plantml.stack import PostgresSpec, S3Spec, make_stack
from plantml.stack.local import LOOPBACK, LocalMLflow, LocalPostgres, free_port
from plantml.stack.services import MLflowServerSpec

RESULTS = Path(__file__).parent / "results" / "stack_startup.json"


def time_whole_stack(backend: str = "local") -> float:
    """From nothing to every service answering (the images already present for containers)."""
    stack = make_stack(backend)
    started = time.perf_counter()
    stack.start()
    elapsed = time.perf_counter() - started
    stack.stop()
    return elapsed


def time_mlflow_alone(postgres: LocalPostgres, index: int, workdir: Path) -> float:
    """The server on a fresh database (migrations included, as in the whole stack)."""
    import psycopg2

    database = f"mlflow_bench_{index}"
    conn = psycopg2.connect(host=LOOPBACK, port=postgres.port, user=postgres.spec.user,
                            password=postgres.spec.password, dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{database}"')
    conn.close()
    spec = PostgresSpec(user=postgres.spec.user, password=postgres.spec.password, database=database)
    server = LocalMLflow(workdir, free_port(set()), MLflowServerSpec(), spec.sqlalchemy_uri(LOOPBACK, postgres.port),
                         f"http://{LOOPBACK}:9", S3Spec())
    started = time.perf_counter()
    server.start()
    elapsed = time.perf_counter() - started
    server.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-containers", dest="containers", action="store_false",
                        help="leave the containers backend out (no Docker here)")
    args = parser.parse_args()

    whole: list[float] = []
    alone: list[float] = []
    containers: list[float] = []
    with tempfile.TemporaryDirectory(prefix="plantml-bench-") as tmp:
        workdir = Path(tmp)
        postgres = LocalPostgres(workdir, free_port(set()), PostgresSpec())
        postgres.prepare()
        postgres.start()
        try:
            for index in range(args.repeats):
                whole.append(time_whole_stack())
                alone.append(time_mlflow_alone(postgres, index, workdir))
                line = f"round {index + 1}: whole stack {whole[-1]:.2f} s, MLflow alone {alone[-1]:.2f} s"
                if args.containers:
                    containers.append(time_whole_stack("containers"))
                    line += f", containers stack {containers[-1]:.2f} s"
                print(line, flush=True)
        finally:
            postgres.stop()
            postgres.cleanup()

    result = {
        "repeats": args.repeats,
        "whole_stack_s": whole,
        "mlflow_alone_s": alone,
        "whole_stack_median_s": statistics.median(whole),
        "mlflow_alone_median_s": statistics.median(alone),
    }
    result["ratio"] = result["whole_stack_median_s"] / result["mlflow_alone_median_s"]
    print(f"median whole stack: {result['whole_stack_median_s']:.2f} s")
    print(f"median MLflow alone: {result['mlflow_alone_median_s']:.2f} s")
    print(f"ratio whole/alone: {result['ratio']:.2f} (goal <= 1.3)")
    if containers:
        result["containers_stack_s"] = containers
        result["containers_stack_median_s"] = statistics.median(containers)
        result["containers_vs_local_ratio"] = result["containers_stack_median_s"] / result["whole_stack_median_s"]
        print(f"median containers stack: {result['containers_stack_median_s']:.2f} s")
        print(f"ratio containers/local: {result['containers_vs_local_ratio']:.2f} (goal <= 2)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
