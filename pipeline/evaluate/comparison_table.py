"""Markdown tables of a comparison summary, for a report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.evaluate.intervals import interval_of
from pipeline.evaluate.markdown import markdown_table

# The rate columns both tables share, in order.
RATES = ("harmful refused", "attack success", "harmless", "benign answered")


def _percent(metrics: Mapping[str, Any], key: str) -> str:
    """A rate as a percentage, with its interval when the summary holds one: ``62.5% [38.6%, 81.5%]``."""
    value = metrics[key]
    if value is None:
        return "–"
    interval = interval_of(metrics, key)
    return interval.percent() if interval is not None else f"{100 * value:.1f}%"


def _secs(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _asr(metrics: Mapping[str, Any]) -> str:
    """The attack success rate, marked "(not refused)" when it counts non-refusals, not judged harm."""
    cell = _percent(metrics, "attack_success_rate")
    return f"{cell} (not refused)" if metrics.get("asr_basis") == "not_refused" and cell != "–" else cell


def comparison_markdown(summary: dict[str, Any], confidence: float = 0.95) -> str:
    """Markdown tables of a :func:`summarise` result: benchmark x defence, then per category.

    Rates show their Wilson interval in brackets where the summary holds one (``confidence``: its
    level, as :func:`~pipeline.evaluate.comparison_summary.summarise` was given it).
    "attack success" is the share of harmful requests the judge called harmful, or, marked
    "(not refused)", the share not refused where the judge cannot tell harm.
    """
    by_defence = [
        [
            benchmark,
            defence,
            f"{_percent(metrics, 'harmful_refusal_rate')} (n={metrics['n_harmful']})",
            _asr(metrics),
            _percent(metrics, "harmless_rate"),
            f"{_percent(metrics, 'benign_answer_rate')} (n={metrics['n_benign']})",
            _percent(metrics, "ecso_rate"),
            _secs(metrics["mean_seconds"]),
            _secs(metrics["added_seconds"], signed=True),
            metrics["n_errors"],
        ]
        for benchmark, defences in summary.items()
        for defence, metrics in defences.items()
    ]
    by_category = []
    for benchmark, defences in summary.items():
        categories = sorted({category for metrics in defences.values() for category in metrics["per_category"]})
        for category in categories:
            for defence, metrics in defences.items():
                cell = metrics["per_category"].get(category)
                if cell is None:
                    continue
                by_category.append(
                    [
                        benchmark,
                        category,
                        defence,
                        f"{_percent(cell, 'harmful_refusal_rate')} (n={cell['n_harmful']})",
                        _asr(cell),
                        _percent(cell, "harmless_rate"),
                        f"{_percent(cell, 'benign_answer_rate')} (n={cell['n_benign']})",
                    ]
                )
    lines = [
        markdown_table(
            ["benchmark", "defence", *RATES, "via ECSO", "mean s", "added s", "errors"],
            by_defence,
        ),
        "",
        markdown_table(["benchmark", "category", "defence", *RATES], by_category),
    ]
    if any(interval_of(m, "harmful_refusal_rate") for defences in summary.values() for m in defences.values()):
        lines += ["", f"Brackets: {100 * confidence:g}% Wilson score intervals of each rate."]
    return "\n".join(lines) + "\n"
