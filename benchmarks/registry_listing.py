"""Benchmark: ``ModelRegistry.list_versions`` (``plantml registry list NAME``) on a model of many versions.

Each version's metrics and params come from its run. This times listing a model of N
versions on the local stack with one ``get_run`` request per run, 8 side by side
(``RUNS_PER_SEARCH = 0``, as before), against the runs of the first run's experiment read
by searches of 100 (the default), alternated, and prints the medians and their ratio.
Run: ``python benchmarks/registry_listing.py [--versions 250]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from mlflow import MlflowClient

from plantml.registry import store as store_module
from plantml.registry.registry import ModelRegistry
from plantml.stack import make_stack


def fill(client: MlflowClient, name: str, versions: int) -> None:
    """``versions`` versions of ``name``, each on a run with a few metrics and params, as ``plantml train`` leaves."""
    experiment = client.create_experiment("registry-listing")
    client.create_registered_model(name)
    for index in range(versions):
        run = client.create_run(experiment)
        for key, value in {"val_loss": 1.0 / (index + 1), "val_accuracy": index / versions, "best_val_loss": 0.5}.items():
            client.log_metric(run.info.run_id, key, value)
        client.log_param(run.info.run_id, "backbone", "resnet18")
        client.set_terminated(run.info.run_id)
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)


def time_listing(registry: ModelRegistry, name: str, per_search: int) -> float:
    store_module.RUNS_PER_SEARCH = per_search
    started = time.perf_counter()
    listed = registry.list_versions(name)
    elapsed = time.perf_counter() - started
    assert all(v.metrics.get("val_loss") is not None for v in listed), "a version came back without its run's metrics"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # one line per version created otherwise
    per_search = store_module.RUNS_PER_SEARCH
    stack = make_stack("local")
    stack.start()
    try:
        client = MlflowClient(stack.tracking_uri)
        fill(client, "listing", args.versions)
        registry = ModelRegistry(stack.tracking_uri)
        time_listing(registry, "listing", per_search)  # warm-up: connections, server caches
        times: dict[int, list[float]] = {0: [], per_search: []}
        for _ in range(args.repeats):
            for way in (0, per_search, per_search, 0):
                times[way].append(time_listing(registry, "listing", way))
    finally:
        stack.stop()
    each, searched = statistics.median(times[0]), statistics.median(times[per_search])
    print(f"{args.versions} versions: one get_run per run, {store_module.RUN_READERS} at once {each * 1000:.0f} ms, "
          f"searches of {per_search} {searched * 1000:.0f} ms: {each / searched:.2f}x (medians of {2 * args.repeats})")


if __name__ == "__main__":
    main()
