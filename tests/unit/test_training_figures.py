"""The run's figures stay a bounded picture whatever the number of classes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from plantml.training import figures


def _rendered(fig) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image.open(buffer)


@pytest.mark.parametrize("classes", [2, figures.COUNTS_UP_TO, figures.COUNTS_UP_TO + 1, figures.NAMES_UP_TO + 1, 400])
def test_the_confusion_matrix_is_at_most_1600_pixels_and_counts_only_what_can_be_read(classes):
    """A set of a few hundred species made a 12,200-pixel figure with n² numbers in it: 82 s and 4.3 GB at 200
    classes, at the end of the training. Counts up to COUNTS_UP_TO classes, names up to NAMES_UP_TO, 1,600 px."""
    matrix = [[(i * 7 + j) % 5 for j in range(classes)] for i in range(classes)]
    fig = figures.confusion_matrix(matrix, [f"species {i}" for i in range(classes)])
    ax = fig.axes[0]

    assert max(_rendered(fig).size) <= figures.MAX_INCHES * fig.dpi
    assert len(ax.texts) == (classes * classes if classes <= figures.COUNTS_UP_TO else 0)
    names = [label.get_text() for label in ax.get_yticklabels()]
    if classes <= figures.NAMES_UP_TO:
        assert names == [f"species {i}" for i in range(classes)]
    else:  # matplotlib's own numbered ticks: the classes' indices
        assert not any("species" in name for name in names)
    if classes > figures.COUNTS_UP_TO:
        assert f"({classes} classes; counts in training/training_history.json)" in ax.get_title()


def test_a_class_name_the_font_cannot_draw_prints_no_raw_python_warning():
    """An emoji or a tab in a class name: matplotlib's warnings (two raw lines per character) are not shown by the
    command line, which prints only ``plantml:`` lines."""
    import warnings

    from plantml.cli.warnings_output import shown_warnings

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with shown_warnings():
            _rendered(figures.confusion_matrix([[1, 0], [0, 1]], ["Blätter \N{HERB}", "tab\there"]))
    assert [str(w.message) for w in shown if "Glyph" in str(w.message)] == []
