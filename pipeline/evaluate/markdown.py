"""Markdown tables: the one writer behind every table the stages and reports write."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _cell(value: object) -> str:
    """A cell's text on one line; a ``|`` inside it is escaped so it cannot open a new column."""
    return " ".join(str(value).split("\n")).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table, one line per row, without a trailing newline.

    Every row must have as many cells as ``header``: a ragged row would shift the columns it
    follows, so it is an error naming the row.
    """
    if not header:
        raise ValueError("a Markdown table needs at least one column")
    lines = ["| " + " | ".join(_cell(name) for name in header) + " |", "|" + "---|" * len(header)]
    for number, row in enumerate(rows, start=1):
        if len(row) != len(header):
            raise ValueError(f"row {number} of the table has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(_cell(value) for value in row) + " |")
    return "\n".join(lines)
