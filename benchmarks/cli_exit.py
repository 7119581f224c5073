"""Benchmark: the command line's exit, with and without Python's teardown of every module.

``plantml`` (``plantml.cli.run``) ends with the exit handlers and ``os._exit``; the same command run through
``sys.exit(main())`` ends as any Python program does, tearing down torch, torchvision and MLflow first.
Alternately, N rounds each, for a tiny training on a sqlite store (imports torch, torchvision and MLflow)
and one with ``--no-mlflow``: the command's wall time, the seconds from its last line to its end, and its
CPU time (user + system). Prints medians and the ratios; writes JSON.

Run: ``python benchmarks/cli_exit.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plantml.training import synth

FAST = [sys.executable, "-m", "plantml"]
ORDINARY = [sys.executable, "-c", "import sys; from plantml.cli import main; sys.exit(main())"]
TRAINING = ["train", "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--weights", "none", "--num-workers", "0"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(command: list[str], folder: Path) -> dict[str, float]:
    """One run of ``command`` in ``folder``: wall, the tail after its last line, CPU."""
    cpu, started = children_cpu(), time.monotonic()
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = started
    for _ in process.stdout:  # type: ignore[union-attr]
        last = time.monotonic()
    if process.wait() != 0:
        raise SystemExit(f"{command} failed with exit code {process.returncode}")
    ended = time.monotonic()
    return {"wall_s": ended - started, "tail_s": ended - last, "cpu_s": children_cpu() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "cli_exit.json")
    options = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as scratch:
        data = synth.generate(Path(scratch) / "leaves", synth.SynthSpec(per_class=12, size=32, seed=0))
        cases = {"train (sqlite store)": [*TRAINING, "--data-dir", str(data)],
                 "train --no-mlflow": [*TRAINING, "--no-mlflow", "--data-dir", str(data)]}
        results: dict[str, dict[str, list[dict[str, float]]]] = {case: {"fast": [], "ordinary": []} for case in cases}
        for round_ in range(options.repeats):
            for number, (case, args) in enumerate(cases.items()):
                for variant, prefix in (("fast", FAST), ("ordinary", ORDINARY))[:: 1 if round_ % 2 == 0 else -1]:
                    folder = Path(scratch) / f"{variant}-{round_}-{number}"
                    folder.mkdir()
                    results[case][variant].append(measure([*prefix, *args], folder))
    summary = {}
    print(f"{'command':22} {'':8} {'wall s':>7} {'tail s':>7} {'CPU s':>7}")
    for case, variants in results.items():
        medians = {variant: {key: statistics.median(run[key] for run in runs) for key in ("wall_s", "tail_s", "cpu_s")}
                   for variant, runs in variants.items()}
        for variant, values in medians.items():
            print(f"{case:22} {variant:8} {values['wall_s']:7.2f} {values['tail_s']:7.2f} {values['cpu_s']:7.2f}")
        ratio = {key: medians["fast"][key] / medians["ordinary"][key] for key in ("wall_s", "cpu_s")}
        print(f"{case:22} {'fast/ordinary':14} wall {ratio['wall_s']:.2f}, CPU {ratio['cpu_s']:.2f}")
        summary[case] = {"medians": medians, "fast_over_ordinary": ratio, "runs": variants}
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps({"repeats": options.repeats, "cases": summary}, indent=2))


if __name__ == "__main__":
    main()
