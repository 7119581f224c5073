"""The two figures of a run: learning curves and the test confusion matrix.

Built as bare :class:`matplotlib.figure.Figure` objects (no pyplot state, no display),
so they work in threads and on machines without a screen. matplotlib is imported with the first figure, not
with the command: a training that fails first never pays for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plantml.settings import cache_dir, env_value
from plantml.text import safe_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(**options: Any) -> Figure:
    """A bare matplotlib figure; matplotlib's folder chosen first (:func:`matplotlib_folder`)."""
    matplotlib_folder()
    from matplotlib.figure import Figure

    return Figure(**options)


def matplotlib_folder() -> None:
    """Before matplotlib's import: with no ``MPLCONFIGDIR`` and a HOME where nothing can be written (a service
    account's ``/nonexistent``), its settings and font cache go to ``matplotlib`` in plantml's cache folder. Else
    matplotlib makes a new temporary folder at every start, builds its font cache again in it (seconds), and
    says so in two lines of warning."""
    if "matplotlib" in sys.modules or env_value("MPLCONFIGDIR"):
        return
    try:
        home = Path.home()
    except RuntimeError:  # HOME unset, and an account with no /etc/passwd line
        home = None
    if home is not None and home.is_dir() and os.access(home, os.W_OK):
        return
    folder = cache_dir() / "matplotlib"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a cache folder under that HOME too: matplotlib's own temporary folder, and its warning
    os.environ["MPLCONFIGDIR"] = str(folder)  # matplotlib reads it at its import; DataLoader workers inherit it


def learning_curves(history: Mapping[str, Sequence[float]]) -> Figure:
    """Loss and accuracy per epoch, train against validation, side by side."""
    epochs = history["epoch"]
    fig = new_figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, metric, title in ((loss_ax, "loss", "Loss"), (acc_ax, "accuracy", "Accuracy")):
        ax.plot(epochs, history[f"train_{metric}"], marker="o", label="train")
        ax.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    best = history.get("best_epoch")
    if best:
        for ax in (loss_ax, acc_ax):
            ax.axvline(best, color="grey", linestyle="--", linewidth=1)
    return fig


#: Up to this many classes each cell shows its count; above, the colours alone (the counts are in the run's
#: ``training/training_history.json``): n² numbers cost minutes and gigabytes past a few hundred classes.
COUNTS_UP_TO = 30
#: Up to this many classes the axes name them; above, their names could not be read anyway.
NAMES_UP_TO = 100
#: The figure's largest side, in inches (at matplotlib's 100 dpi): 1,600 pixels whatever the number of classes.
MAX_INCHES = 16.0


def confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str = "Test confusion matrix") -> Figure:
    """A confusion matrix (rows: true class, columns: predicted class): counts in the cells up to
    :data:`COUNTS_UP_TO` classes, class names on the axes up to :data:`NAMES_UP_TO`, at most :data:`MAX_INCHES`
    a side, so that a set of a thousand species costs a second, not the end of its training."""
    classes = [safe_text(name) for name in classes]  # a folder name that is not UTF-8 has no glyphs
    n = len(classes)
    size = min(max(4.0, 0.6 * n + 2), MAX_INCHES)
    fig = new_figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Greens", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    if n <= NAMES_UP_TO:
        fontsize = min(10.0, 0.6 * size * 72 / n)  # points: at most about half a row's height
        ax.set_xticks(range(n), labels=classes, rotation=45, ha="right", fontsize=fontsize)
        ax.set_yticks(range(n), labels=classes, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= COUNTS_UP_TO:
        peak = max((max(row) for row in matrix), default=0) or 1
        for i in range(n):
            for j in range(n):
                value = matrix[i][j]
                ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    else:
        title = f"{title} ({n} classes; counts in training/training_history.json)"
    ax.set_title(title)
    return fig
