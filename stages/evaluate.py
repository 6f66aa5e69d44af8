"""DVC stage ``evaluate``: LSI and plain baselines on the test split, overall and per category.

Every baseline is fitted on the same train split and thresholded on the same calibration split
at the same target false-positive rate as LSI, so the numbers compare like with like.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.baselines import (
    fit_logistic,
    length_features,
    lsi_inputs,
    positive_scores,
    style_features,
)
from pipeline.calibration import choose_tau, load_calibration
from pipeline.config import load_params
from pipeline.features import LSIFeatures, aligned_features
from pipeline.metrics import detection_metrics, per_group_metrics, roc_points
from pipeline.plots import plot_roc
from pipeline.probe import load_probe
from pipeline.store import ActivationStore
from stages.common import CALIBRATION, INDEX, PROBE_DIR, STORE, run_stage, write_json_atomic

OUT = Path("data/eval")


def _baseline_inputs(frame: pl.DataFrame, features: LSIFeatures) -> dict[str, np.ndarray]:
    texts = frame["text"].to_list()
    return {
        "logreg_hs_delta": lsi_inputs(features),
        "length_only": length_features(texts),
        "style_only": style_features(texts),
    }


def main() -> None:
    """Score the test split with LSI and every baseline; write metrics, ROC data and a PNG."""
    from pipeline.dataset import read_index

    params = load_params()
    probe, meta = load_probe(PROBE_DIR)
    calibration = load_calibration(CALIBRATION)
    index = read_index(INDEX)
    store = ActivationStore.open(STORE)
    parts = {split: index.filter(pl.col("split") == split) for split in ("train", "calib", "test")}
    features = {
        split: aligned_features(store, part["row_id"].to_numpy(), meta.fusion_layer, meta.safety_layer)
        for split, part in parts.items()
    }
    labels = {split: part["label"].to_numpy() for split, part in parts.items()}

    scorers: dict[str, Callable[[str], np.ndarray]] = {"lsi": lambda split: probe.score(features[split])}
    inputs = {split: _baseline_inputs(parts[split], features[split]) for split in parts}
    for name in inputs["train"]:
        model = fit_logistic(inputs["train"][name], labels["train"], seed=params.train.seed)
        scorers[name] = lambda split, m=model, n=name: positive_scores(m, inputs[split][n])

    detectors: dict[str, Any] = {}
    points: list[dict[str, Any]] = []
    test_scores: dict[str, np.ndarray] = {}
    for name, score in scorers.items():
        # LSI uses the calibrate stage's tau; baselines get theirs the same way, on the same split.
        tau = (
            calibration.tau
            if name == "lsi"
            else choose_tau(labels["calib"], score("calib"), params.calibrate.target_fpr).tau
        )
        test_scores[name] = score("test")
        detectors[name] = {"tau": tau, **detection_metrics(labels["test"], test_scores[name], tau)}
        points.extend(roc_points(labels["test"], test_scores[name], name))

    scored = (
        parts["test"]
        .select("row_id", "source", "category", "label", "text")
        .with_columns(pl.Series("score", test_scores["lsi"]))
    )
    metrics = {
        "detectors": detectors,
        "lsi_per_category": per_group_metrics(scored, "category", calibration.tau),
        "target_fpr": params.calibrate.target_fpr,
        "fusion_layer": meta.fusion_layer,
        "safety_layer": meta.safety_layer,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    write_json_atomic(OUT / "metrics.json", metrics)
    # One CSV per detector: ``dvc plots`` draws each file in the folder as its own curve.
    (OUT / "roc").mkdir(exist_ok=True)
    for name in detectors:
        with open(OUT / "roc" / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["fpr", "tpr"])
            writer.writeheader()
            writer.writerows({"fpr": p["fpr"], "tpr": p["tpr"]} for p in points if p["detector"] == name)
    scored.with_columns(*(pl.Series(f"score_{n}", s) for n, s in test_scores.items() if n != "lsi")).write_parquet(
        OUT / "test_scores.parquet"
    )
    plot_roc(points, OUT / "roc.png", f"Test split ROC (n={len(labels['test'])})")
    for name, row in detectors.items():
        print(
            f"{name:22s} AUROC {row['auroc']:.3f}  TPR@5%FPR {row['tpr_at_5pct_fpr']:.3f}  "
            f"F1@tau {row['f1']:.3f}  FPR@tau {row['fpr']:.3f}"
        )


if __name__ == "__main__":
    run_stage(main)
