"""The one Markdown-table writer every report table goes through."""

from __future__ import annotations

import pytest

from pipeline.evaluate.markdown import markdown_table


def test_a_table_has_a_header_a_rule_and_one_line_per_row() -> None:
    table = markdown_table(["detector", "AUROC"], [["lsi", "0.880"], ["logreg_plain", 0.5]])
    assert table == "| detector | AUROC |\n|---|---|\n| lsi | 0.880 |\n| logreg_plain | 0.5 |"


def test_a_pipe_or_newline_in_a_cell_cannot_break_the_columns() -> None:
    table = markdown_table(["text"], [["a | b\nc"]])
    assert table.splitlines()[2] == "| a \\| b c |"


def test_a_ragged_row_is_refused_by_number() -> None:
    with pytest.raises(ValueError, match="row 2 of the table has 1 cells, the header 2"):
        markdown_table(["a", "b"], [["1", "2"], ["3"]])


def test_a_table_without_columns_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one column"):
        markdown_table([], [])
