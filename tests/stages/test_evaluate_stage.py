"""The evaluate stage's held-out tables: the configured grouping first, each under its own heading."""

from __future__ import annotations

import polars as pl

from stages.evaluate import comparison_markdown, held_out_groupings


def _summary(groups: list[str]) -> dict:
    cell = {"n": 10, "auroc": 0.8, "tpr_at_5pct_fpr": 0.4, "tpr": 0.5, "fpr": 0.1}
    return {
        "lsi": {
            "mean_auroc": 0.8,
            "min_auroc": 0.8,
            "max_fpr": 0.1,
            "per_group": {g: {**cell, "tpr_at_shipped_tau": 0.5, "fpr_at_shipped_tau": float("nan")} for g in groups},
        }
    }


def test_the_configured_grouping_comes_first_and_every_grouping_follows() -> None:
    assert held_out_groupings("upstream") == ["upstream", "presentation", "source"]
    assert held_out_groupings("source") == ["source", "upstream", "presentation"]


def test_comparison_markdown_heads_each_table_and_marks_missing_labels() -> None:
    summaries = {"upstream": _summary(["llm-attacks/llm-attacks"]), "presentation": _summary(["question"])}
    text = comparison_markdown(summaries, "upstream", "lsi", "paired", pl.DataFrame())
    assert text.index("## Held out by upstream (the headline") < text.index("## Held out by presentation")
    assert "llm-attacks/llm-attacks 0.50 / -" in text  # a harmful-only upstream has no benign rows to flag
    assert "Per source" not in text
    assert comparison_markdown({}, "upstream", "lsi", "paired", pl.DataFrame()).startswith("No held-out results")
