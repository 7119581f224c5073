"""Benchmark: ``ModelRegistry.list_versions`` (``plantml registry list NAME``) on a model of many versions.

Each version's metrics and params come from its run, one ``get_run`` request each. This
times listing a model of N versions on the local stack with those requests one after
another (``RUN_READERS = 1``) against side by side (the default), alternated, and prints
the medians and their ratio. Run: ``python benchmarks/registry_listing.py [--versions 40]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from mlflow import MlflowClient

from plantml.registry import registry as registry_module
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


def time_listing(registry: ModelRegistry, name: str, readers: int) -> float:
    registry_module.RUN_READERS = readers
    started = time.perf_counter()
    listed = registry.list_versions(name)
    elapsed = time.perf_counter() - started
    assert all(v.metrics.get("val_loss") is not None for v in listed), "a version came back without its run's metrics"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # one line per version created otherwise
    default_readers = registry_module.RUN_READERS
    stack = make_stack("local")
    stack.start()
    try:
        client = MlflowClient(stack.tracking_uri)
        fill(client, "listing", args.versions)
        registry = ModelRegistry(stack.tracking_uri)
        time_listing(registry, "listing", default_readers)  # warm-up: connections, server caches
        times: dict[int, list[float]] = {1: [], default_readers: []}
        for _ in range(args.repeats):
            for readers in (1, default_readers, default_readers, 1):
                times[readers].append(time_listing(registry, "listing", readers))
    finally:
        stack.stop()
    one, many = statistics.median(times[1]), statistics.median(times[default_readers])
    print(f"{args.versions} versions: one request at a time {one * 1000:.0f} ms, {default_readers} at once "
          f"{many * 1000:.0f} ms: {one / many:.2f}x (medians of {2 * args.repeats})")


if __name__ == "__main__":
    main()
