"""The PNG figures: reliability diagram and annotated heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from pipeline.detect.calibration import reliability_rows
from pipeline.evaluate.plots import plot_defences, plot_heatmap, plot_reliability

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        return image.size


def test_reliability_diagram_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.uniform(0, 1, 200)
    labels = (rng.uniform(size=200) < probabilities).astype(int)
    rows = {
        "raw": reliability_rows(labels, probabilities, 10),
        "platt": reliability_rows(labels, np.sqrt(probabilities), 10),
    }
    path = tmp_path / "nested" / "reliability.png"
    plot_reliability(rows, path, "reliability")
    width, height = png_size(path)
    assert 500 <= width <= 800 and 600 <= height <= 900  # 5.5 x 6 inches at 120 dpi
    assert path.stat().st_size > 10_000
    assert plt.get_fignums() == []  # the figure was closed


def test_heatmap_with_a_nan_cell(tmp_path: Path) -> None:
    values = np.array([[0.91, 0.85, np.nan], [0.7, 0.66, 0.99]])
    path = tmp_path / "heatmap.png"
    plot_heatmap(values, [3, 6], ["12", "18", "24"], path, "AUROC by layer", "fusion layer", "safety layer")
    width, height = png_size(path)
    assert 200 <= width <= 600 and 150 <= height <= 500
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # colours drawn, not a blank canvas
    assert plt.get_fignums() == []


def test_heatmap_all_nan_and_custom_format(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    plot_heatmap(np.full((1, 2), np.nan), ["a"], ["b", "c"], path, "nothing yet", "x", "y", value_format="{:.0%}")
    assert png_size(path)[0] > 0


def test_heatmap_shape_must_match_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 rows x 2 columns"):
        plot_heatmap(np.zeros((2, 3)), ["a", "b"], ["x", "y"], tmp_path / "bad.png", "t", "x", "y")


def test_defence_chart_shows_each_rate_only_where_the_label_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def metrics(refused: float | None, answered: float | None) -> dict:
        return {"harmful_refusal_rate": refused, "benign_answer_rate": answered}

    summary = {
        "attack": {"none": metrics(0.0, None), "lsi": metrics(0.5, None)},
        "utility": {"none": metrics(None, 1.0), "lsi": metrics(None, 0.9)},
    }
    ticks: list[list[str]] = []
    real = plt.Axes.set_xticks

    def record(ax, positions, labels=None, **kwargs):  # type: ignore[no-untyped-def]
        ticks.append(list(labels or []))
        return real(ax, positions, labels, **kwargs)

    monkeypatch.setattr(plt.Axes, "set_xticks", record)
    path = tmp_path / "chart.png"
    plot_defences(summary, path, "t")
    assert png_size(path)[0] > 300
    assert ticks == [["attack"], ["utility"]]  # no empty slot for a benchmark without that label
