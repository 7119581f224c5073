"""Rows printed as left-aligned columns, the first row the header (``registry list``, ``stack list``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click


def table(rows: Sequence[Sequence[Any]]) -> list[str]:
    """Rows as left-aligned columns; the first row is the header."""
    text = [["" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in text) for i in range(len(text[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in text]


def echo_table(rows: Sequence[Sequence[Any]]) -> None:
    for line in table(rows):
        click.echo(line)
