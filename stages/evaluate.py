"""DVC stage ``evaluate``: LSI and every baseline on the same rows, in-source and held out.

In-source, the shipped probe and every baseline (fitted on the same train split, thresholded on
the same calibration split by the same rule) are scored on the test split. Held out, each
upstream project in turn (then each presentation, then each source file) is left out of
training, validation and calibration for every detector, which is then scored on that group's
rows. The upstream table is the headline (``train.held_out_by``); the per-source table sits beside
the in-source numbers as a secondary view.
"""

from __future__ import annotations

import csv
from typing import Any

import numpy as np
import polars as pl

from pipeline.config import HELD_OUT_BY, Params, load_params
from pipeline.data.index import read_index
from pipeline.detect.calibration import expected_calibration_error, load_calibration, reliability_rows
from pipeline.detect.cluster_open import open_cluster, resolve_cluster
from pipeline.detect.heldout import in_source_setting, load_eval_data, scoreable_groups
from pipeline.detect.provenance import open_store
from pipeline.detect.shipped import load_detector
from pipeline.detect.store import ActivationStore
from pipeline.evaluate.detection import (
    HeldOutResults,
    comparison_table,
    fit_detectors,
    held_out_markdown,
    held_out_results,
    held_out_summary,
    per_source_metrics,
    score_setting,
)
from pipeline.evaluate.intervals import BootstrapSpec, interval_of
from pipeline.evaluate.markdown import markdown_table
from pipeline.evaluate.metrics import per_group_metrics, roc_points
from pipeline.evaluate.paired import held_out_comparison, in_source_paired, paired_markdown, paired_record
from pipeline.evaluate.plots import plot_reliability, plot_roc
from pipeline.evaluate.refusal_direction import readout_from_adapter, store_refusal_scores
from pipeline.io import replace_dir_atomic, write_json_atomic
from pipeline.layout import CALIBRATION, EVAL_DIR, INDEX, PROBE_DIR, STORE
from pipeline.models.registry import load_adapter
from stages import run_record, run_stage

OUT = EVAL_DIR


def refusal_direction_scores(params: Params, store: ActivationStore) -> np.ndarray:
    """The training-free HiddenDetect-style score of every store row (plain framing), from the model's head."""
    readout = readout_from_adapter(load_adapter(params.model), params.evaluate.refusal_words)
    return store_refusal_scores(store, readout, list(params.evaluate.refusal_layers))


def _markdown(table: pl.DataFrame) -> str:
    """A Markdown table of the side-by-side comparison, three decimals; a value and its ``_low`` / ``_high``
    columns share one cell, ``0.860 [0.790, 0.920]``."""
    columns = [c for c in table.columns if not c.endswith(("_low", "_high"))]
    rows = []
    for row in table.iter_rows(named=True):
        cells = []
        for column in columns:
            value, interval = row[column], interval_of(row, column)
            if interval is not None:
                cells.append(interval.format(3))
            else:
                cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        rows.append(cells)
    return markdown_table(columns, rows) + "\n"


def _shown(row: dict[str, Any], key: str, digits: int = 3) -> str:
    """A metric with its interval for the printout."""
    interval = interval_of(row, key)
    return interval.format(digits) if interval is not None else f"{row[key]:.{digits}f}"


def held_out_groupings(primary: str) -> list[str]:
    """The held-out tables to compute: ``primary`` (``train.held_out_by``) first, then the others."""
    return [primary, *(by for by in HELD_OUT_BY if by != primary)]


def comparison_markdown(
    summaries: dict[str, dict[str, Any]], primary: str, shipped: str, paired_table: str, table: pl.DataFrame
) -> str:
    """``comparison.md``: the held-out tables (``primary`` first), the paired tests, the per-source side by side."""
    if not summaries:
        return "No held-out results: the index holds a single upstream, presentation and source.\n\n" + paired_table
    parts = []
    for by, summary in summaries.items():
        title = f"## Held out by {by}" + (" (the headline: train.held_out_by)" if by == primary else "")
        parts.append(title + "\n\n" + held_out_markdown(summary, shipped, by))
    parts.append(paired_table)
    if table.height:
        parts.append("## Per source, in-source and held out, side by side\n\n" + _markdown(table))
    return "\n".join(parts)


def main() -> None:
    """Score every detector in-source and held-out; write metrics, the comparison table, ROC data and PNGs."""
    params = load_params()
    shipped, meta = load_detector(PROBE_DIR)
    calibration = load_calibration(CALIBRATION)
    index = read_index(INDEX)
    # Checked before the model loads: a store from another setup is refused by field name.
    store = open_store(params, STORE)
    refusal = refusal_direction_scores(params, store)
    data = load_eval_data(index, store, refusal)
    lf, ls = meta.fusion_layer, meta.safety_layer
    inside = in_source_setting(index)
    bootstrap = BootstrapSpec(params.evaluate.bootstrap_resamples, params.evaluate.confidence, seed=params.train.seed)

    scorers, chosen_layers = fit_detectors(data, inside, params.train, lf, ls, shipped=shipped)
    # The shipped detector keeps the calibrate stage's tau (however it was chosen); the others get theirs here.
    detectors = score_setting(
        data,
        inside,
        scorers,
        params.calibrate,
        layers=chosen_layers,
        taus={shipped.name: calibration.tau},
        bootstrap=bootstrap,
    )
    taus = {name: row["tau"] for name, row in detectors.items()}
    per_source = per_source_metrics(data, inside, scorers, taus, bootstrap)
    shipped_tau = (shipped.name, calibration.tau)
    held: dict[str, HeldOutResults] = {}
    with open_cluster(resolve_cluster(params.cluster, with_model=False)) as client:
        for by in held_out_groupings(params.train.held_out_by):
            groups = scoreable_groups(index, by, split="test")
            if len(groups) < 2:
                continue
            # On a cluster each held-out group's refits are a task, and each worker reads the store itself.
            if client is None:
                results = held_out_results(
                    data, params.train, params.calibrate, lf, ls, groups, shipped_tau, bootstrap, by, progress=True
                )
            else:
                # Imported only here: it imports distributed (the 'cluster' extra, which open_cluster checked).
                from pipeline.evaluate.cluster_refits import held_out_results_on_cluster

                results = held_out_results_on_cluster(
                    client,
                    store,
                    index,
                    refusal,
                    params.train,
                    params.calibrate,
                    lf,
                    ls,
                    groups,
                    shipped_tau,
                    bootstrap,
                    by,
                    progress=True,
                )
            held[by] = results
    labels = data.labels
    test_scores = {name: score(inside.test) for name, score in scorers.items()}
    # The shipped detector against each baseline, on the same held-out rows.
    comparisons = {by: held_out_comparison(shipped.name, r.labels, r.scores, bootstrap) for by, r in held.items()}
    summaries = {by: held_out_summary(r.metrics, comparisons[by]) for by, r in held.items()}
    primary = params.train.held_out_by
    paired = paired_record(
        shipped.name,
        bootstrap,
        in_source_paired(shipped.name, labels[inside.test], test_scores, bootstrap),
        comparisons.get(primary),
    )
    cross = held["source"].metrics if "source" in held else {}
    table = comparison_table(per_source, cross) if cross else pl.DataFrame()
    probabilities = calibration.probability(test_scores[shipped.name])
    reliability = reliability_rows(labels[inside.test], probabilities, params.calibrate.bins)
    scored = (
        index[inside.test]
        .select("row_id", "source", "category", "label", "text")
        .with_columns(pl.Series("score", test_scores[shipped.name]))
    )
    metrics = {
        "shipped": {"detector": shipped.name, "describe": shipped.describe(), "held_out_auroc": meta.held_out_auroc},
        "detectors": detectors,
        "per_source": per_source,
        "cross_source": cross,
        "held_out_by": primary,
        "held_out_summary": summaries.get(primary, {}),
        "held_out": {by: summaries[by] for by in summaries},
        "shipped_per_category": per_group_metrics(scored, "category", calibration.tau, bootstrap),
        "paired": paired,
        "intervals": {
            "confidence": bootstrap.confidence,
            "bootstrap_resamples": bootstrap.resamples,
            "seed": bootstrap.seed,
            "rates": "wilson",
            "ranking": "stratified bootstrap, percentile",
        },
        "shipped_test_ece": expected_calibration_error(labels[inside.test], probabilities, params.calibrate.bins),
        "shipped_scaling": calibration.scaling.kind,
        "target_fpr": params.calibrate.target_fpr,
        "fusion_layer": lf,
        "safety_layer": ls,
        "run": run_record(store.provenance.model_name, store.provenance.model_revision, "cpu"),
    }
    # Built beside data/eval and swapped in whole (persist: true in dvc.yaml).
    with replace_dir_atomic(OUT) as out:
        write_json_atomic(out / "metrics.json", metrics)
        # Written even with one source (header only), so the stage's outputs always exist.
        table.write_csv(out / "comparison.csv")
        paired_table = paired_markdown(paired, list(detectors))
        (out / "comparison.md").write_text(comparison_markdown(summaries, primary, shipped.name, paired_table, table))
        write_json_atomic(out / "reliability.json", reliability)
        plot_reliability(
            {f"{shipped.name} ({calibration.scaling.kind})": reliability},
            out / "reliability.png",
            f"{shipped.name} (shipped) on the test split",
        )
        # One CSV per detector: ``dvc plots`` draws each file in the folder as its own curve.
        points: list[dict[str, Any]] = []
        (out / "roc").mkdir(exist_ok=True)
        for name in detectors:
            rows = roc_points(labels[inside.test], test_scores[name], name)
            points.extend(rows)
            with open(out / "roc" / f"{name}.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["fpr", "tpr"])
                writer.writeheader()
                writer.writerows({"fpr": p["fpr"], "tpr": p["tpr"]} for p in rows)
        scored.with_columns(
            *(pl.Series(f"score_{n}", s) for n, s in test_scores.items() if n != shipped.name)
        ).write_parquet(out / "test_scores.parquet")
        plot_roc(points, out / "roc.png", f"Test split ROC (n={len(inside.test)})")

    print(f"shipped detector: {shipped.describe()} (tau {calibration.tau:.4f})")
    print(f"in-source test split (n={len(inside.test)}), LSI pair fusion {lf} / safety {ls}")
    print(
        f"  [{100 * bootstrap.confidence:g}% intervals: {bootstrap.resamples} stratified bootstrap resamples; Wilson]"
    )
    for name, row in detectors.items():
        print(
            f"  {name:22s} AUROC {_shown(row, 'auroc')}  TPR@5%FPR {_shown(row, 'tpr_at_5pct_fpr')}  "
            f"F1@tau {_shown(row, 'f1')}  FPR@tau {_shown(row, 'fpr')}"
        )
    for by, summary in summaries.items():
        print(f"held out, each {by} in turn (all its rows): AUROC / TPR@5%FPR / FPR at the held-out tau")
        print(held_out_markdown(summary, shipped.name, by))
    print(paired_table)


if __name__ == "__main__":
    run_stage(main)
