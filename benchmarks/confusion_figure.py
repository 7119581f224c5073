"""Benchmark: the run's confusion-matrix figure as the number of classes grows.

A tracked training ends by drawing ``figures/confusion_matrix.png``. It used to be 0.6 inch a class with every
count written in its cell: n² text objects, a figure that grows with n (12,200 px at 200 classes). Now counts up
to ``COUNTS_UP_TO`` classes, names up to ``NAMES_UP_TO``, at most ``MAX_INCHES`` a side. Both are drawn here
(build and save as PNG, as ``log_figure`` does), alternately, for the same matrices; prints medians of the seconds,
the ratios and the peak memory each added, and writes JSON.

Run: ``python benchmarks/confusion_figure.py [--repeats 3] [--classes 10 50 100 200]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "confusion_figure.json"

# The figure as it was before the bound (plantml 0.1's figures.confusion_matrix), run in its own process too.
BEFORE = '''
from matplotlib.figure import Figure
def draw(matrix, classes):
    n = len(classes)
    size = max(4.0, 0.6 * n + 2)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Greens")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted"); ax.set_ylabel("true"); ax.set_title("Test confusion matrix")
    peak = max((max(row) for row in matrix), default=0) or 1
    for i in range(n):
        for j in range(n):
            value = matrix[i][j]
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    return fig
'''
AFTER = "from plantml.training.figures import confusion_matrix as draw\n"
MEASURE = '''
import io, json, resource, sys, time
n = int(sys.argv[1])
matrix = [[(i * 7 + j) % 5 + (20 if i == j else 0) for j in range(n)] for i in range(n)]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
buffer = io.BytesIO()
draw(matrix, [f"species {i}" for i in range(n)]).savefig(buffer, format="png")
seconds = time.perf_counter() - started
from PIL import Image
print(json.dumps({"seconds": seconds, "pixels": Image.open(buffer).size[0],
                  "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
'''


def measure(code: str, classes: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code + MEASURE, str(classes)], capture_output=True, text=True,
                         check=True, timeout=1800)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 50, 100, 200])
    args = parser.parse_args()
    results = {}
    for n in args.classes:
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(args.repeats):
            runs["before"].append(measure(BEFORE, n))
            runs["after"].append(measure(AFTER, n))
        row = {name: {key: statistics.median(run[key] for run in rows) for key in rows[0]} for name, rows in runs.items()}
        row["ratio"] = row["after"]["seconds"] / row["before"]["seconds"]
        results[n] = row
        print(f"{n:5d} classes: before {row['before']['seconds']:6.2f} s {row['before']['pixels']:6.0f} px "
              f"{row['before']['peak_mb']:7.0f} MB | after {row['after']['seconds']:5.2f} s {row['after']['pixels']:5.0f} px "
              f"{row['after']['peak_mb']:5.0f} MB | ratio {row['ratio']:.3f}", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
