"""The two figures of a run: learning curves and the test confusion matrix.

Built as bare :class:`matplotlib.figure.Figure` objects (no pyplot state, no display),
so they work in threads and on machines without a screen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure

from plantml.text import safe_text


def learning_curves(history: Mapping[str, Sequence[float]]) -> Figure:
    """Loss and accuracy per epoch, train against validation, side by side."""
    epochs = history["epoch"]
    fig = Figure(figsize=(10, 4), layout="constrained")
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


def confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str = "Test confusion matrix") -> Figure:
    """A confusion matrix (rows: true class, columns: predicted class) with counts in the cells."""
    classes = [safe_text(name) for name in classes]  # a folder name that is not UTF-8 has no glyphs
    n = len(classes)
    size = max(4.0, 0.6 * n + 2)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Greens")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = max((max(row) for row in matrix), default=0) or 1
    for i in range(n):
        for j in range(n):
            value = matrix[i][j]
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    return fig
