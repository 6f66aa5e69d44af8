"""LSI and every baseline fitted and scored on the same rows, in-source and leave-one-source-out.

A *setting* names which index rows train, validate, calibrate and test. In-source, those are the
index's own splits. Cross-source, one source is held out: every detector trains, picks its epoch
or layer and its threshold on the other sources only, and is scored on the held-out source's test
rows, the same rows its in-source number comes from. The gap between the two is how much of a
score was the source's style rather than the request's intent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from pipeline.config import CalibrateConfig, TrainConfig
from pipeline.detect.calibration import choose_tau_by_method
from pipeline.detect.detector import DETECTORS, PLAIN, Detector, LinearDetector
from pipeline.detect.heldout import EvalData, Setting, fit_detector, fold_setting, group_fold
from pipeline.detect.logistic import fit_logistic, positive_scores
from pipeline.evaluate.baselines import length_features, style_features
from pipeline.evaluate.intervals import BootstrapSpec, interval_of
from pipeline.evaluate.markdown import markdown_table
from pipeline.evaluate.metrics import detection_metrics
from pipeline.evaluate.paired import HeldOutComparison

LENGTH_ONLY, STYLE_ONLY = "length_only", "style_only"


Scorer = Callable[[np.ndarray], np.ndarray]


def fit_detectors(
    data: EvalData,
    setting: Setting,
    config: TrainConfig,
    lf: int,
    ls: int,
    shipped: Detector | None = None,
) -> tuple[dict[str, Scorer], dict[str, int]]:
    """Every detector fitted on ``setting``; each maps row positions to scores (higher = more harmful).

    The detectors are LSI and the linear probes (:data:`pipeline.detect.detector.DETECTORS`), the
    length-only and style-only baselines, and the refusal direction when ``data`` holds it.
    Also returns the layer each layer-choosing detector picked on the setting's val rows.
    ``shipped``: an already trained detector used under its own name instead of fitting one
    (the run's shipped detector, in-source).
    """
    labels = data.labels
    scorers: dict[str, Scorer] = {}
    layers: dict[str, int] = {}
    for name in DETECTORS:
        detector = shipped if shipped is not None and shipped.name == name else None
        detector = detector or fit_detector(data, setting, name, config, lf, ls)
        scorers[name] = lambda rows, d=detector: data.scores(d, rows)
        if name == PLAIN and isinstance(detector, LinearDetector):
            # One name in every setting; the layer it chose may differ between settings and is returned.
            layers[name] = detector.pieces[0].layer
    texts: dict[str, Callable[[Sequence[str]], np.ndarray]] = {LENGTH_ONLY: length_features, STYLE_ONLY: style_features}
    for name, make in texts.items():
        model = fit_logistic(make(data.texts(setting.train)), labels[setting.train], seed=config.seed)
        scorers[name] = lambda rows, m=model, f=make: positive_scores(m, f(data.texts(rows)))
    if data.refusal is not None:
        refusal = data.refusal
        scorers["refusal_direction"] = lambda rows: refusal[rows]
    return scorers, layers


def score_setting(
    data: EvalData,
    setting: Setting,
    scorers: Mapping[str, Scorer],
    calibration: CalibrateConfig,
    also: np.ndarray | None = None,
    layers: Mapping[str, int] | None = None,
    taus: Mapping[str, float] | None = None,
    bootstrap: BootstrapSpec | None = None,
) -> dict[str, dict[str, Any]]:
    """Each detector's threshold from the setting's calib rows, then its metrics on the test rows.

    ``also``: more rows to score at the same threshold, reported under ``all_rows``.
    ``taus``: thresholds already chosen (the calibrate stage's, for the shipped probe), used as given.
    ``bootstrap``: add each metric's interval (:func:`~pipeline.evaluate.metrics.detection_metrics`).
    """
    labels = data.labels
    results: dict[str, dict[str, Any]] = {}
    for name, score in scorers.items():
        if taus and name in taus:
            tau = float(taus[name])
        else:
            tau = choose_tau_by_method(labels[setting.calib], score(setting.calib), calibration).tau
        results[name] = {"tau": tau, **detection_metrics(labels[setting.test], score(setting.test), tau, bootstrap)}
        if also is not None:
            results[name]["all_rows"] = detection_metrics(labels[also], score(also), tau, bootstrap)
        if layers and name in layers:
            results[name]["layer"] = layers[name]
    return results


def per_source_metrics(
    data: EvalData,
    setting: Setting,
    scorers: Mapping[str, Scorer],
    taus: Mapping[str, float],
    bootstrap: BootstrapSpec | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Metrics of each detector on each source's share of the setting's test rows, at the given taus."""
    labels, sources = data.labels, data.index["source"].to_numpy()
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for source in sorted(set(sources[setting.test])):
        rows = setting.test[sources[setting.test] == source]
        result[source] = {
            name: detection_metrics(labels[rows], score(rows), taus[name], bootstrap) for name, score in scorers.items()
        }
    return result


@dataclass(frozen=True)
class HeldOutResults:
    """Each held-out source's metrics per detector, and the scores they came from.

    ``metrics``: ``{source: {detector: metrics}}``.
    ``labels`` / ``scores``: per source, the labels of all its rows and each detector's scores on
    them (the detector fitted without the source), for paired tests on the same rows.
    """

    metrics: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def held_out_results(
    data: EvalData,
    config: TrainConfig,
    calibration: CalibrateConfig,
    lf: int,
    ls: int,
    groups: Sequence[str],
    shipped_tau: tuple[str, float] | None = None,
    bootstrap: BootstrapSpec | None = None,
    by: str = "source",
    *,
    progress: bool = False,
) -> HeldOutResults:
    """For each group of index column ``by``, every detector refitted without it and scored on its test rows
    (and on all its rows).

    ``shipped_tau``: ``(detector, tau)``; that detector's rows also get ``at_shipped_tau``, its
    metrics on the group's own rows at the run's own tau, the threshold a new upstream meets.
    ``bootstrap``: add each metric's interval.
    ``progress``: a progress bar over the groups (each one refits every detector: minutes in all).
    """
    bar = tqdm(groups, desc=f"held out by {by}", unit="group", disable=not progress)
    return merge_held_out(
        [group_results(data, config, calibration, lf, ls, group, shipped_tau, bootstrap, by) for group in bar]
    )


def group_results(
    data: EvalData,
    config: TrainConfig,
    calibration: CalibrateConfig,
    lf: int,
    ls: int,
    group: str,
    shipped_tau: tuple[str, float] | None = None,
    bootstrap: BootstrapSpec | None = None,
    by: str = "source",
) -> HeldOutResults:
    """One group of :func:`held_out_results`: every detector refitted without it, scored on its rows.

    A group of one label is scored with the other groups' test rows of the other label, which no
    detector of the fold trained, validated or calibrated on (:meth:`GroupFold.scored_rows`).
    A task of its own on a cluster (:mod:`pipeline.evaluate.cluster_refits`).
    """
    fold = group_fold(data.index, by, group)
    setting = fold_setting(data.index, fold)
    if len(np.unique(data.labels[setting.train])) < 2 or len(np.unique(data.labels[setting.calib])) < 2:
        raise ValueError(
            f"holding out {by} {group!r} leaves training or calibration rows of one label only; "
            f"add {by} values with both labels"
        )
    every_row = np.sort(np.union1d(fold.own, setting.test))
    scorers, layers = fit_detectors(data, setting, config, lf, ls)
    metrics = score_setting(data, setting, scorers, calibration, also=every_row, layers=layers, bootstrap=bootstrap)
    scores = {name: np.asarray(score(every_row), dtype=np.float64) for name, score in scorers.items()}
    if shipped_tau is not None:
        name, tau = shipped_tau
        own = np.isin(every_row, fold.own)
        # On the group's own rows: the share of its harmful requests refused and of its benign ones flagged.
        metrics[name]["at_shipped_tau"] = detection_metrics(data.labels[fold.own], scores[name][own], tau, bootstrap)
    return HeldOutResults({group: metrics}, {group: data.labels[every_row]}, {group: scores})


def merge_held_out(parts: Sequence[HeldOutResults]) -> HeldOutResults:
    """One :class:`HeldOutResults` from per-source ones, sources in the order given."""
    merged = HeldOutResults()
    for part in parts:
        merged.metrics.update(part.metrics)
        merged.labels.update(part.labels)
        merged.scores.update(part.scores)
    return merged


def _with_ends(row: Mapping[str, Any], key: str, name: str | None = None) -> dict[str, Any]:
    """``{name: row[key]}``, plus ``name_low`` / ``name_high`` when ``row`` holds the key's interval."""
    name = name or key
    out = {name: row.get(key, float("nan"))}
    if f"{key}_low" in row:
        out[f"{name}_low"], out[f"{name}_high"] = row[f"{key}_low"], row[f"{key}_high"]
    return out


def comparison_table(
    in_source: Mapping[str, Mapping[str, Mapping[str, Any]]],
    cross_source: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> pl.DataFrame:
    """One row per (source, detector): AUROC and FPR / TPR at tau in-source and held out, side by side.

    Where the metrics hold intervals, each value is followed by its ``_low`` / ``_high`` columns.
    """
    rows = []
    for source, detectors in cross_source.items():
        for name, cross in detectors.items():
            inside = in_source.get(source, {}).get(name, {})
            rows.append(
                {
                    "source": source,
                    "detector": name,
                    "n_test": cross["n"],
                    **_with_ends(inside, "auroc", "auroc_in_source"),
                    **_with_ends(cross, "auroc", "auroc_cross_source"),
                    "n_all_rows": cross["all_rows"]["n"],
                    **_with_ends(cross["all_rows"], "auroc", "auroc_cross_source_all_rows"),
                    **_with_ends(inside, "fpr", "fpr_in_source"),
                    **_with_ends(cross, "fpr", "fpr_cross_source"),
                    **_with_ends(inside, "tpr", "tpr_in_source"),
                    **_with_ends(cross, "tpr", "tpr_cross_source"),
                    **_with_ends(cross["all_rows"], "fpr", "fpr_cross_source_all_rows"),
                }
            )
    return pl.DataFrame(rows)


SUMMARY_KEYS = ("auroc", "tpr_at_5pct_fpr", "tpr", "fpr")


def held_out_summary(
    cross_source: Mapping[str, Mapping[str, Mapping[str, Any]]], comparison: HeldOutComparison | None = None
) -> dict[str, dict[str, Any]]:
    """Per detector, over held-out groups (all of each group's scored rows): mean and lowest AUROC, and per group
    the AUROC, TPR at 5% FPR, and the shares of harmful (TPR) and benign (FPR) rows flagged at the tau
    chosen without the group; for the shipped detector also those shares on the group's own rows at the
    run's tau (``tpr_at_shipped_tau`` / ``fpr_at_shipped_tau``).

    Intervals the metrics hold are carried along (``<key>_low`` / ``<key>_high``); ``comparison``
    (:func:`~pipeline.evaluate.paired.held_out_comparison`) adds those of the mean and lowest AUROC.
    """
    summary: dict[str, dict[str, Any]] = {}
    names = next(iter(cross_source.values()), {}).keys()
    for name in names:
        per_group: dict[str, dict[str, Any]] = {}
        for group, rows in cross_source.items():
            cell: dict[str, Any] = {"n": rows[name]["all_rows"]["n"]}
            for key in SUMMARY_KEYS:
                cell.update(_with_ends(rows[name]["all_rows"], key))
            per_group[group] = cell
        aurocs = np.array([row["auroc"] for row in per_group.values()], dtype=np.float64)
        for group, rows in cross_source.items():
            if "at_shipped_tau" in rows[name]:
                at = rows[name]["at_shipped_tau"]
                per_group[group].update(
                    **_with_ends(at, "tpr", "tpr_at_shipped_tau"), **_with_ends(at, "fpr", "fpr_at_shipped_tau")
                )
        summary[name] = {
            "mean_auroc": float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else float("nan"),
            "min_auroc": float(np.nanmin(aurocs)) if np.isfinite(aurocs).any() else float("nan"),
            "max_fpr": float(np.nanmax([row["fpr"] for row in per_group.values()])),
            "per_group": per_group,
        }
        if comparison is not None and name in comparison.mean_auroc:
            for key, interval in (
                ("mean_auroc", comparison.mean_auroc[name]),
                ("min_auroc", comparison.min_auroc[name]),
            ):
                summary[name][f"{key}_low"], summary[name][f"{key}_high"] = interval.low, interval.high
    return summary


def _shown(row: Mapping[str, Any], key: str, digits: int) -> str:
    """A value with its interval when ``row`` holds one (``0.86 [0.79, 0.92]``), else the value alone."""
    interval = interval_of(row, key)
    return interval.format(digits) if interval is not None else f"{row[key]:.{digits}f}"


def held_out_markdown(summary: Mapping[str, Mapping[str, Any]], shipped: str, by: str = "source") -> str:
    """The held-out summary as a Markdown table: one row per detector, AUROC / TPR@5%FPR / FPR@tau per ``by`` group."""
    if not summary:
        return ""
    groups = list(next(iter(summary.values()))["per_group"])
    head = ["detector", "mean AUROC", "min AUROC", *groups]
    rows = []
    for name, row in summary.items():
        cells = [
            f"{_shown(c, 'auroc', 3)} / {_shown(c, 'tpr_at_5pct_fpr', 2)} / {_shown(c, 'fpr', 2)}"
            for c in row["per_group"].values()
        ]
        label = f"**{name}** (shipped)" if name == shipped else name
        rows.append([label, _shown(row, "mean_auroc", 3), _shown(row, "min_auroc", 3), *cells])
    note = (
        f"\nEach {by} held out in turn: every detector fitted, validated and thresholded without it, then scored on "
        f"all its rows (a {by} of one label against the other {by}s' test rows of the other label). "
        "Cells: AUROC / TPR at 5% FPR / share of benign rows flagged at that tau."
    )
    if any("auroc_low" in c for row in summary.values() for c in row["per_group"].values()):
        note += (
            " Brackets: the interval (stratified bootstrap for AUROC and TPR at 5% FPR, Wilson for the share "
            f"flagged; the mean and lowest AUROC resample each {by} on its own)."
        )
    note += "\n"
    cells = summary.get(shipped, {}).get("per_group", {})
    if cells and all("fpr_at_shipped_tau" in c for c in cells.values()):
        at = ", ".join(
            f"{group} {_flagged(c, 'tpr_at_shipped_tau')} / {_flagged(c, 'fpr_at_shipped_tau')}"
            for group, c in cells.items()
        )
        note += (
            f"\nAt the run's own tau, the shipped {shipped}'s share of each {by}'s own harmful / benign rows "
            f"flagged (- where it has none): {at}.\n"
        )
    return markdown_table(head, rows) + "\n" + note


def _flagged(cell: Mapping[str, Any], key: str) -> str:
    """A share flagged, or ``-`` where the group holds no row of that label."""
    value = cell.get(key, float("nan"))
    return "-" if value is None or np.isnan(value) else _shown(cell, key, 2)
