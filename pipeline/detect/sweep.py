"""Layer choice from data: LSI trained for every (fusion, safety) pair of stored layers.

Each pair is scored two ways: validation AUROC in-source (train split -> val split), and the mean
over held-out sources of the AUROC on that source's validation rows when it took no part in
training. The second is what a new source will look like, so it is the default way to choose.
Test rows are never read here: they stay untouched for the evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from pipeline.config import LAYER_CHOICE, TrainConfig
from pipeline.detect.detector import DETECTORS, LSI, LSIDetector
from pipeline.detect.heldout import (
    EvalData,
    Setting,
    SourceFold,
    fit_detector,
    fit_lsi,
    in_source_setting,
    source_fold,
    source_folds,
    two_class_sources,
)
from pipeline.detect.probe import auroc_or_nan
from pipeline.errors import LSIGuardError
from pipeline.layout import require


class SweepError(LSIGuardError, ValueError):
    """Layers asked for that the layer sweep's results do not hold."""


@dataclass(frozen=True, kw_only=True)
class PairScore:
    """One (fusion, safety) pair's validation AUROC in-source and its mean held-out-source AUROC."""

    fusion_layer: int
    safety_layer: int
    val_auroc: float
    cross_source_auroc: float


def validation_setting(index: pl.DataFrame, fold: SourceFold) -> Setting:
    """Train / val on the other sources' train / val rows; score the held-out source's val rows."""
    return Setting(
        name=f"held_out_val:{fold.source}",
        train=fold.split_rows(index, "train"),
        val=fold.split_rows(index, "val"),
        calib=np.zeros(0, dtype=np.int64),
        test=fold.split_rows(index, "val", own=True),
    )


def held_out_validation(index: pl.DataFrame, source: str) -> Setting:
    """Train / val on the other sources' train / val rows; score ``source``'s val rows."""
    return validation_setting(index, source_fold(index, source))


@dataclass(frozen=True)
class DetectorScore:
    """One detector's held-out-source validation AUROC per source, and their mean."""

    name: str
    held_out_auroc: float
    per_source: dict[str, float]


def held_out_settings(data: EvalData) -> list[Setting]:
    """:func:`held_out_validation` for every source whose rows, and whose complement's, hold both labels.

    The folds are scikit-learn's ``LeaveOneGroupOut`` by source (:func:`~pipeline.detect.heldout.source_folds`).
    """
    labels, two_class = data.labels, set(two_class_sources(data.index))
    settings = [validation_setting(data.index, f) for f in source_folds(data.index) if f.source in two_class]
    return [s for s in settings if len(np.unique(labels[s.train])) == 2 and len(np.unique(labels[s.test])) == 2]


def score_detectors(
    data: EvalData, config: TrainConfig, lf: int, ls: int, names: tuple[str, ...] = DETECTORS, progress: bool = True
) -> list[DetectorScore]:
    """Each detector fitted without each source in turn and scored on that source's validation rows.

    The mean over sources is what the guard's ``best`` detector is chosen by; test rows stay unread.
    """
    labels, settings = data.labels, held_out_settings(data)
    results = []
    for name in tqdm(names, desc="detectors", disable=not progress):
        per_source = {
            s.name.split(":", 1)[1]: auroc_or_nan(
                labels[s.test], data.scores(fit_detector(data, s, name, config, lf, ls), s.test)
            )
            for s in settings
        }
        mean = float(np.mean(list(per_source.values()))) if per_source else float("nan")
        results.append(DetectorScore(name, mean, per_source))
    return results


def choose_detector(scores: list[DetectorScore], choice: str) -> DetectorScore:
    """LSI for ``choice`` ``lsi``; for ``best`` the highest mean held-out AUROC (ties and NaN keep LSI)."""
    by_name = {s.name: s for s in scores}
    if LSI not in by_name:
        raise SweepError("the detector scores hold no LSI entry")
    if choice == LSI:
        return by_name[LSI]
    best = by_name[LSI]
    for score in scores:
        if not np.isnan(score.held_out_auroc) and score.held_out_auroc > np.nan_to_num(best.held_out_auroc, nan=-1):
            best = score
    return best


def read_detector_scores(sweep: Path) -> list[DetectorScore]:
    """The detector scores the sweep stage wrote to ``sweep``."""
    require(sweep, "'dvc repro sweep' (no detector scores to choose the shipped detector from)")
    rows = json.loads(sweep.read_text(encoding="utf-8")).get("detectors")
    if not isinstance(rows, list) or not rows:
        raise SweepError(f"{sweep}: no detector scores; rerun the sweep stage (dvc repro sweep)")
    return [DetectorScore(**row) for row in rows]


def sweep_pairs(data: EvalData, config: TrainConfig, progress: bool = True) -> list[PairScore]:
    """Every ordered pair of stored layers, scored in-source and across sources."""
    inside = in_source_setting(data.index)
    held_out = held_out_settings(data)
    pairs = layer_pairs(data.layers)
    return [
        score_pair(data, inside, held_out, config, lf, ls)
        for lf, ls in tqdm(pairs, desc="layer sweep", disable=not progress)
    ]


def layer_pairs(layers: tuple[int, ...]) -> list[tuple[int, int]]:
    """Every ordered ``(fusion, safety)`` pair of stored layers, in sweep order."""
    return list(product(layers, layers))


def score_pair(
    data: EvalData, inside: Setting, held_out: list[Setting], config: TrainConfig, lf: int, ls: int
) -> PairScore:
    """One pair: LSI trained in-source and scored on the val split, then once per held-out setting."""
    labels = data.labels
    val_auroc = auroc_or_nan(labels[inside.val], _harmful(fit_lsi(data, inside, config, lf, ls), data, inside.val))
    cross = [auroc_or_nan(labels[s.test], _harmful(fit_lsi(data, s, config, lf, ls), data, s.test)) for s in held_out]
    return PairScore(
        fusion_layer=lf,
        safety_layer=ls,
        val_auroc=val_auroc,
        cross_source_auroc=float(np.mean(cross)) if cross else float("nan"),
    )


def _harmful(detector: LSIDetector, data: EvalData, rows: np.ndarray) -> np.ndarray:
    """The probe's harmful scores of the given row positions (``predict_proba``'s second column)."""
    return detector.predict_proba(detector.inputs(data.states[rows], data.layers))[:, 1]


def best_pair(scores: list[PairScore], select_by: str) -> PairScore:
    """The pair with the highest chosen score (``cross_source`` falls back to ``val`` when undefined).

    Ties go to the first pair in sweep order (shallower fusion, then shallower safety layer).
    """
    key = "cross_source_auroc" if select_by == "cross_source" else "val_auroc"
    if all(np.isnan(getattr(s, key)) for s in scores):
        key = "val_auroc"
    return max(scores, key=lambda s: -np.inf if np.isnan(getattr(s, key)) else getattr(s, key))


def score_matrix(scores: list[PairScore], layers: tuple[int, ...], key: str) -> np.ndarray:
    """``(fusion, safety)`` matrix of one score, NaN where a pair is missing."""
    matrix = np.full((len(layers), len(layers)), np.nan)
    for s in scores:
        matrix[layers.index(s.fusion_layer), layers.index(s.safety_layer)] = getattr(s, key)
    return matrix


def resolve_layers(fusion_layer: int | str, safety_layer: int | str, select_by: str, sweep: Path) -> tuple[int, int]:
    """The layers to train at: fixed ones as given, ``best`` ones from the sweep results in ``sweep``.

    A layer fixed beside a ``best`` one restricts the choice to swept pairs that have it.
    """
    if fusion_layer != LAYER_CHOICE and safety_layer != LAYER_CHOICE:
        return int(fusion_layer), int(safety_layer)
    require(sweep, "'dvc repro sweep' (no layer sweep to take 'best' layers from)")
    scores = [PairScore(**row) for row in json.loads(sweep.read_text(encoding="utf-8"))["pairs"]]
    allowed = [
        s
        for s in scores
        if fusion_layer in (LAYER_CHOICE, s.fusion_layer) and safety_layer in (LAYER_CHOICE, s.safety_layer)
    ]
    if not allowed:
        raise SweepError(f"{sweep}: no swept pair has fusion layer {fusion_layer} and safety layer {safety_layer}")
    best = best_pair(allowed, select_by)
    return best.fusion_layer, best.safety_layer
