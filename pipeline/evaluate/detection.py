"""LSI and every baseline fitted and scored on the same rows, in-source and leave-one-source-out.

A *setting* names which index rows train, validate, calibrate and test. In-source, those are the
index's own splits. Cross-source, one source is held out: every detector trains, picks its epoch
or layer and its threshold on the other sources only, and is scored on the held-out source's test
rows, the same rows its in-source number comes from. The gap between the two is how much of a
score was the source's style rather than the request's intent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from pipeline.config import CalibrateConfig, TrainConfig
from pipeline.detect.calibration import choose_tau_by_method
from pipeline.detect.heldout import EvalData, Setting, fit_lsi, held_out_setting
from pipeline.detect.probe import LSIProbe
from pipeline.evaluate.baselines import (
    choose_plain_layer,
    delta_only_inputs,
    fit_logistic,
    hs_only_inputs,
    length_features,
    lsi_inputs,
    positive_scores,
    style_features,
)
from pipeline.evaluate.metrics import detection_metrics

LENGTH_ONLY, STYLE_ONLY, PLAIN = "length_only", "style_only", "logreg_plain"


Scorer = Callable[[np.ndarray], np.ndarray]


def fit_detectors(
    data: EvalData,
    setting: Setting,
    config: TrainConfig,
    lf: int,
    ls: int,
    probe: LSIProbe | None = None,
) -> tuple[dict[str, Scorer], dict[str, int]]:
    """Every detector fitted on ``setting``; each maps row positions to scores (higher = more harmful).

    Also returns the layer each layer-choosing detector picked on the setting's val rows.
    ``probe``: an already trained LSI probe to use instead of training one (the shipped probe, in-source).
    """
    labels = data.labels
    lsi_probe = probe or fit_lsi(data, setting, config, lf, ls)
    scorers: dict[str, Scorer] = {"lsi": lambda rows: lsi_probe.score(data.lsi(rows, lf, ls))}

    inputs: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "logreg_hs_delta": lambda rows: lsi_inputs(data.lsi(rows, lf, ls)),
        "logreg_hs": lambda rows: hs_only_inputs(data.lsi(rows, lf, ls)),
        "logreg_delta": lambda rows: delta_only_inputs(data.lsi(rows, lf, ls)),
    }
    plain_layer, _ = choose_plain_layer(
        {k: data.plain(setting.train, k) for k in data.layers},
        labels[setting.train],
        {k: data.plain(setting.val, k) for k in data.layers},
        labels[setting.val],
        seed=config.seed,
    )
    # One name in every setting; the layer it chose may differ between settings and is returned.
    inputs[PLAIN] = lambda rows: data.plain(rows, plain_layer)
    inputs[LENGTH_ONLY] = lambda rows: length_features(data.texts(rows))
    inputs[STYLE_ONLY] = lambda rows: style_features(data.texts(rows))
    for name, make in inputs.items():
        model = fit_logistic(make(setting.train), labels[setting.train], seed=config.seed)
        scorers[name] = lambda rows, m=model, f=make: positive_scores(m, f(rows))
    if data.refusal is not None:
        refusal = data.refusal
        scorers["refusal_direction"] = lambda rows: refusal[rows]
    return scorers, {PLAIN: plain_layer}


def score_setting(
    data: EvalData,
    setting: Setting,
    scorers: Mapping[str, Scorer],
    calibration: CalibrateConfig,
    also: np.ndarray | None = None,
    layers: Mapping[str, int] | None = None,
    taus: Mapping[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each detector's threshold from the setting's calib rows, then its metrics on the test rows.

    ``also``: more rows to score at the same threshold, reported under ``all_rows``.
    ``taus``: thresholds already chosen (the calibrate stage's, for the shipped probe), used as given.
    """
    labels = data.labels
    results: dict[str, dict[str, Any]] = {}
    for name, score in scorers.items():
        if taus and name in taus:
            tau = float(taus[name])
        else:
            tau = choose_tau_by_method(labels[setting.calib], score(setting.calib), calibration).tau
        results[name] = {"tau": tau, **detection_metrics(labels[setting.test], score(setting.test), tau)}
        if also is not None:
            results[name]["all_rows"] = detection_metrics(labels[also], score(also), tau)
        if layers and name in layers:
            results[name]["layer"] = layers[name]
    return results


def per_source_metrics(
    data: EvalData, setting: Setting, scorers: Mapping[str, Scorer], taus: Mapping[str, float]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Metrics of each detector on each source's share of the setting's test rows, at the given taus."""
    labels, sources = data.labels, data.index["source"].to_numpy()
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for source in sorted(set(sources[setting.test])):
        rows = setting.test[sources[setting.test] == source]
        result[source] = {
            name: detection_metrics(labels[rows], score(rows), taus[name]) for name, score in scorers.items()
        }
    return result


def cross_source_results(
    data: EvalData,
    config: TrainConfig,
    calibration: CalibrateConfig,
    lf: int,
    ls: int,
    sources: Sequence[str],
) -> dict[str, dict[str, dict[str, Any]]]:
    """For each source, every detector refitted without it and scored on its test rows (and all its rows)."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for source in sources:
        setting = held_out_setting(data.index, source)
        if len(np.unique(data.labels[setting.train])) < 2 or len(np.unique(data.labels[setting.calib])) < 2:
            raise ValueError(
                f"holding out source {source!r} leaves training or calibration rows of one label only; "
                "add sources with both labels"
            )
        every_row = np.flatnonzero(data.index["source"].to_numpy() == source)
        scorers, layers = fit_detectors(data, setting, config, lf, ls)
        results[source] = score_setting(data, setting, scorers, calibration, also=every_row, layers=layers)
    return results


def comparison_table(
    in_source: Mapping[str, Mapping[str, Mapping[str, Any]]],
    cross_source: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> pl.DataFrame:
    """One row per (source, detector): AUROC and FPR / TPR at tau in-source and held out, side by side."""
    rows = []
    for source, detectors in cross_source.items():
        for name, cross in detectors.items():
            inside = in_source.get(source, {}).get(name, {})
            rows.append(
                {
                    "source": source,
                    "detector": name,
                    "n_test": cross["n"],
                    "auroc_in_source": inside.get("auroc", float("nan")),
                    "auroc_cross_source": cross["auroc"],
                    "n_all_rows": cross["all_rows"]["n"],
                    "auroc_cross_source_all_rows": cross["all_rows"]["auroc"],
                    "fpr_in_source": inside.get("fpr", float("nan")),
                    "fpr_cross_source": cross["fpr"],
                    "tpr_in_source": inside.get("tpr", float("nan")),
                    "tpr_cross_source": cross["tpr"],
                    "fpr_cross_source_all_rows": cross["all_rows"]["fpr"],
                }
            )
    return pl.DataFrame(rows)
