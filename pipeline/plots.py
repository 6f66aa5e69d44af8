"""PNG figures for people; ``dvc plots`` reads the same data from CSV/JSON."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


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
