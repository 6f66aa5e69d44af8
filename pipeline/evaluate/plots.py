"""PNG figures for people; ``dvc plots`` reads the same data from CSV/JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: stages run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_roc(points: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """One ROC curve per detector from rows of ``detector``, ``fpr``, ``tpr``."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    detectors = list(dict.fromkeys(p["detector"] for p in points))
    for name in detectors:
        rows = [p for p in points if p["detector"] == name]
        ax.plot([r["fpr"] for r in rows], [r["tpr"] for r in rows], label=name, drawstyle="steps-post")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false-positive rate (benign refused)", ylabel="true-positive rate (harmful refused)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(rows_by_name: Mapping[str, Sequence[dict[str, Any]]], path: Path, title: str) -> None:
    """A reliability diagram: one line per name (e.g. ``raw``, ``platt``) from :func:`reliability_rows`
    rows, against the diagonal of perfect calibration, over a bar panel of how many rows fall in each bin."""
    fig, (curve, counts) = plt.subplots(
        2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, layout="constrained"
    )
    curve.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    names = list(rows_by_name)
    for offset, name in enumerate(names):
        rows = rows_by_name[name]
        (line,) = curve.plot(
            [r["mean_predicted"] for r in rows], [r["fraction_harmful"] for r in rows], marker="o", label=name
        )
        # bars for the names sit side by side inside each bin
        widths = [(r["bin_upper"] - r["bin_lower"]) / len(names) for r in rows]
        lefts = [r["bin_lower"] + offset * w for r, w in zip(rows, widths, strict=True)]
        counts.bar(lefts, [r["count"] for r in rows], width=widths, align="edge", color=line.get_color(), alpha=0.7)
    curve.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="fraction harmful", title=title)
    curve.legend(loc="upper left", fontsize=8)
    counts.set(xlabel="mean predicted probability of harmful", ylabel="rows")
    _save(fig, path)


def plot_heatmap(
    values: np.ndarray,
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    value_format: str = "{:.3f}",
) -> None:
    """A heatmap of a 2-D array with every cell annotated by ``value_format``; NaN cells stay blank."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"heatmap values {values.shape} do not match {len(row_labels)} rows x {len(col_labels)} columns"
        )
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(col_labels), 1.2 + 0.5 * len(row_labels)), layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if len(finite) else 0.0
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            # dark text on the bright end of viridis, light text on the dark end
            color = "black" if value > middle else "white"
            ax.text(col, row, value_format.format(value), ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(image, ax=ax)
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    """Write the figure as a PNG, creating its folder, and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_defences(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path, title: str) -> None:
    """Per benchmark, one bar per defence for each of harmful refused and benign answered (missing rates skipped).

    ``summary`` is :func:`pipeline.evaluate.comparison.summarise`'s ``{benchmark: {defence: metrics}}``.
    """
    benchmarks = list(summary)
    defences = list(dict.fromkeys(d for per in summary.values() for d in per))
    panels = [("harmful_refusal_rate", "harmful requests refused"), ("benign_answer_rate", "benign requests answered")]
    fig, axes = plt.subplots(1, 2, figsize=(3.0 + 1.2 * len(benchmarks) * 2, 4.2), layout="constrained", squeeze=False)
    width = 0.8 / max(len(defences), 1)
    colours = {"none": "#8c8c8c", "lsi": "#1f77b4", "ecso": "#ff7f0e", "lsi_then_ecso": "#2ca02c"}
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        # Only the benchmarks with requests of this panel's label (benign-only sets have no refusal rate).
        shown = [b for b in benchmarks if any(m.get(key) is not None for m in summary[b].values())]
        for offset, defence in enumerate(defences):
            xs, heights = [], []
            for position, benchmark in enumerate(shown):
                value = summary[benchmark].get(defence, {}).get(key)
                if value is not None:
                    xs.append(position + (offset - (len(defences) - 1) / 2) * width)
                    heights.append(value)
            ax.bar(xs, heights, width=width, label=defence, color=colours.get(defence))
        ax.set_xticks(range(len(shown)), shown, rotation=20, ha="right")
        ax.set(ylim=(0, 1.05), title=label)
    axes[0][0].set_ylabel("share of requests")
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(name, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=len(defences), fontsize=8)
    fig.suptitle(title)
    _save(fig, path)
