"""Layer choice from data: LSI trained for every (fusion, safety) pair of stored layers.

Each pair is scored two ways: validation AUROC in-source (train split -> val split), and the mean
over held-out groups (``train.held_out_by``: upstream projects by default) of the AUROC on that
group's validation rows when it took no part in training. The second is what requests from
elsewhere will look like, so it is the default way to choose. Test rows are never read here:
they stay untouched for the evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import sem
from tqdm import tqdm

from pipeline.config import LAYER_CHOICE, TrainConfig
from pipeline.detect.detector import DELTA_ONLY, DETECTORS, HS_DELTA, HS_ONLY, LSI, PLAIN, PLAIN_ALL, LSIDetector
from pipeline.detect.heldout import (
    EvalData,
    GroupFold,
    Setting,
    fit_detector,
    fit_lsi,
    group_fold,
    group_folds,
    in_source_setting,
    scoreable_groups,
)
from pipeline.detect.probe import auroc_or_nan
from pipeline.errors import LSIGuardError
from pipeline.layout import require


class SweepError(LSIGuardError, ValueError):
    """Layers asked for that the layer sweep's results do not hold."""


# The order in which near-tied detectors ship (TrainConfig.select_tolerance): one stored block first
# (the plain prompt's, then a framing's, then the difference), two blocks next (LSI after the
# logistic regression on the same inputs, since it adds a trained projector), every block last.
FEWEST_INPUTS_FIRST: tuple[str, ...] = (PLAIN, HS_ONLY, DELTA_ONLY, HS_DELTA, LSI, PLAIN_ALL)


@dataclass(frozen=True, kw_only=True)
class PairScore:
    """One (fusion, safety) pair's validation AUROC in-source and its mean held-out-group AUROC."""

    fusion_layer: int
    safety_layer: int
    val_auroc: float
    held_out_auroc: float


def validation_setting(index: pl.DataFrame, fold: GroupFold) -> Setting:
    """Train / val on the other groups' train / val rows; score the held-out group's val rows
    (with the other label's val rows when the group holds one label: :meth:`GroupFold.scored_rows`)."""
    return Setting(
        name=f"held_out_val:{fold.group}",
        train=fold.split_rows(index, "train"),
        val=fold.split_rows(index, "val"),
        calib=np.zeros(0, dtype=np.int64),
        test=fold.scored_rows(index, "val"),
    )


def held_out_validation(index: pl.DataFrame, by: str, group: str) -> Setting:
    """Train / val without ``group`` of column ``by``; score its val rows."""
    return validation_setting(index, group_fold(index, by, group))


@dataclass(frozen=True, kw_only=True)
class DetectorScore:
    """One detector's held-out validation AUROC per held-out group, and their mean; ``seeds``: how many
    trainings each group's AUROC averages (:func:`selection_seeds`)."""

    name: str
    held_out_auroc: float
    per_group: dict[str, float]
    seeds: int = 1


def held_out_settings(index: pl.DataFrame, by: str) -> list[Setting]:
    """:func:`held_out_validation` for every group of column ``by`` whose scored rows, and whose
    complement's training rows, hold both labels.

    The folds are scikit-learn's ``LeaveOneGroupOut`` (:func:`~pipeline.detect.heldout.group_folds`).
    """
    labels, scoreable = index["label"].to_numpy(), set(scoreable_groups(index, by))
    settings = [validation_setting(index, f) for f in group_folds(index, by) if f.group in scoreable]
    return [s for s in settings if len(np.unique(labels[s.train])) == 2 and len(np.unique(labels[s.test])) == 2]


def held_out_group(setting: Setting) -> str:
    """The group a :func:`validation_setting` holds out (its name after the colon)."""
    return setting.name.split(":", 1)[1]


def score_detectors(
    data: EvalData, config: TrainConfig, lf: int, ls: int, names: tuple[str, ...] = DETECTORS, progress: bool = True
) -> list[DetectorScore]:
    """Each detector fitted without each held-out group (``config.held_out_by``) in turn and scored on its
    validation rows.

    The mean over groups is what the guard's ``best`` detector is chosen by; test rows stay unread.
    """
    settings = held_out_settings(data.index, config.held_out_by)
    aurocs = [
        [detector_auroc(data, s, name, config, lf, ls) for s in settings]
        for name in tqdm(names, desc="detectors", disable=not progress)
    ]
    return detector_scores(names, [held_out_group(s) for s in settings], aurocs, config)


def selection_seeds(name: str, config: TrainConfig) -> tuple[int, ...]:
    """The seeds detector ``name`` is trained with when the sweep scores it: ``config.selection_seeds`` of
    them from ``config.seed`` for LSI, whose training is stochastic; ``config.seed`` alone for the
    logistic regressions, whose convex fits do not depend on it."""
    count = config.selection_seeds if name == LSI else 1
    return tuple(config.seed + i for i in range(count))


def detector_auroc(data: EvalData, setting: Setting, name: str, config: TrainConfig, lf: int, ls: int) -> float:
    """Detector ``name`` fitted on ``setting``'s training rows: its AUROC on the setting's scored rows,
    the mean over its :func:`selection_seeds` (one training per seed)."""
    aurocs = []
    for seed in selection_seeds(name, config):
        detector = fit_detector(data, setting, name, replace(config, seed=seed), lf, ls)
        aurocs.append(auroc_or_nan(data.labels[setting.test], data.scores(detector, setting.test)))
    return float(np.mean(aurocs))


def detector_scores(
    names: tuple[str, ...], groups: list[str], aurocs: list[list[float]], config: TrainConfig
) -> list[DetectorScore]:
    """One :class:`DetectorScore` per name from its AUROC per group (``aurocs[detector][group]``)."""
    results = []
    for name, row in zip(names, aurocs, strict=True):
        per_group = dict(zip(groups, row, strict=True))
        mean = float(np.mean(row)) if row else float("nan")
        results.append(
            DetectorScore(name=name, held_out_auroc=mean, per_group=per_group, seeds=len(selection_seeds(name, config)))
        )
    return results


def choose_detector(scores: list[DetectorScore], choice: str, tolerance: float = 0.0) -> DetectorScore:
    """LSI for ``choice`` ``lsi``; for ``best`` the detector with the fewest inputs (:data:`FEWEST_INPUTS_FIRST`)
    among those whose mean held-out AUROC is within :func:`tie_margin` of the highest (LSI when none has one).

    Detectors this close are not told apart by the validation rows, so the simpler one ships: it is
    cheaper and has less to overfit.
    """
    by_name = {s.name: s for s in scores}
    if LSI not in by_name:
        raise SweepError("the detector scores hold no LSI entry")
    scored = [s for s in scores if not np.isnan(s.held_out_auroc)]
    if choice == LSI or not scored:
        return by_name[LSI]
    top = max(scored, key=lambda s: s.held_out_auroc)
    margin = tie_margin(top, tolerance)
    tied = [s for s in scored if s.held_out_auroc >= top.held_out_auroc - margin]
    return min(tied, key=lambda s: (_inputs_rank(s.name), -s.held_out_auroc))


def tie_margin(top: DetectorScore, tolerance: float) -> float:
    """How far below ``top`` a detector still ties with it: ``tolerance`` or one standard error, the larger.

    The standard error is that of ``top``'s mean over its held-out groups (the one-standard-error
    rule): a handful of small validation groups moves a mean by about that much, so a detector
    within it is not shown to be worse. ``tolerance`` is the floor for float rounding (the same
    states extracted on another CPU moved a score by 0.019).
    """
    groups = [v for v in top.per_group.values() if not np.isnan(v)]
    error = float(sem(groups)) if len(groups) >= 2 else 0.0
    return max(tolerance, error)


def _inputs_rank(name: str) -> int:
    """Where ``name`` stands in :data:`FEWEST_INPUTS_FIRST` (a detector it does not name comes last)."""
    return FEWEST_INPUTS_FIRST.index(name) if name in FEWEST_INPUTS_FIRST else len(FEWEST_INPUTS_FIRST)


def read_detector_scores(sweep: Path) -> list[DetectorScore]:
    """The detector scores the sweep stage wrote to ``sweep``."""
    require(sweep, "'dvc repro sweep' (no detector scores to choose the shipped detector from)")
    rows = json.loads(sweep.read_text(encoding="utf-8")).get("detectors")
    if not isinstance(rows, list) or not rows:
        raise SweepError(f"{sweep}: no detector scores; rerun the sweep stage (dvc repro sweep)")
    try:
        return [DetectorScore(**row) for row in rows]
    except TypeError as error:  # written by another version (keys renamed or missing)
        raise SweepError(f"{sweep}: detector scores of another version ({error}); rerun the sweep stage") from error


def sweep_pairs(data: EvalData, config: TrainConfig, progress: bool = True) -> list[PairScore]:
    """Every ordered pair of stored layers scored in-source; the ``config.held_out_pairs`` best of
    them (every pair when 0) also on held-out groups (``config.held_out_by``), the rest NaN there."""
    inside = in_source_setting(data.index)
    pairs = layer_pairs(data.layers)
    val = [
        val_score(data, inside, config, lf, ls)
        for lf, ls in tqdm(pairs, desc="layer sweep, in-source", disable=not progress)
    ]
    held_out = held_out_settings(data.index, config.held_out_by)
    chosen = pairs_for_held_out(pairs, val, config.held_out_pairs)
    cross = {
        pair: held_out_score(data, held_out, config, *pair)
        for pair in tqdm(chosen, desc="layer sweep, held-out", disable=not progress)
    }
    return pair_scores(pairs, val, cross)


@dataclass(frozen=True)
class SweepResult:
    """What the sweep stage writes: every pair's scores, the pair chosen from them, and each detector's
    held-out validation scores at that pair."""

    pairs: list[PairScore]
    best: PairScore
    detectors: list[DetectorScore]


def sweep(data: EvalData, config: TrainConfig, progress: bool = True) -> SweepResult:
    """:func:`sweep_pairs`, the :func:`best_pair` by ``config.select_by``, then :func:`score_detectors` there."""
    pairs = sweep_pairs(data, config, progress)
    best = best_pair(pairs, config.select_by, config.select_tolerance)
    detectors = score_detectors(data, config, best.fusion_layer, best.safety_layer, progress=progress)
    return SweepResult(pairs, best, detectors)


def layer_pairs(layers: tuple[int, ...]) -> list[tuple[int, int]]:
    """Every ordered ``(fusion, safety)`` pair of stored layers, in sweep order."""
    return list(product(layers, layers))


def pairs_for_held_out(pairs: list[tuple[int, int]], val: list[float], count: int) -> list[tuple[int, int]]:
    """The ``count`` pairs with the highest in-source validation AUROC (every pair when ``count`` is 0
    or covers them all), in sweep order. Ties keep sweep order; NaN ranks last.

    The held-out half costs one fit per held-out group, so scoring it on a shortlist is what keeps
    the sweep affordable as groups and rows grow (``bench/sweep.py`` measures the saving).
    """
    if count == 0 or count >= len(pairs):
        return list(pairs)
    order = sorted(range(len(pairs)), key=lambda i: (-np.nan_to_num(val[i], nan=-np.inf), i))
    keep = set(order[:count])
    return [pair for i, pair in enumerate(pairs) if i in keep]


def pair_scores(pairs: list[tuple[int, int]], val: list[float], cross: dict[tuple[int, int], float]) -> list[PairScore]:
    """One :class:`PairScore` per pair, in sweep order; NaN held-out AUROC where the pair was not held out."""
    return [
        PairScore(fusion_layer=lf, safety_layer=ls, val_auroc=v, held_out_auroc=cross.get((lf, ls), float("nan")))
        for (lf, ls), v in zip(pairs, val, strict=True)
    ]


def val_score(data: EvalData, inside: Setting, config: TrainConfig, lf: int, ls: int) -> float:
    """One pair's LSI trained in-source (train split) and scored on the val split."""
    return auroc_or_nan(data.labels[inside.val], _harmful(fit_lsi(data, inside, config, lf, ls), data, inside.val))


def held_out_score(data: EvalData, held_out: list[Setting], config: TrainConfig, lf: int, ls: int) -> float:
    """One pair's mean AUROC over the held-out settings, LSI trained once without each group."""
    labels = data.labels
    cross = [auroc_or_nan(labels[s.test], _harmful(fit_lsi(data, s, config, lf, ls), data, s.test)) for s in held_out]
    return float(np.mean(cross)) if cross else float("nan")


def _harmful(detector: LSIDetector, data: EvalData, rows: np.ndarray) -> np.ndarray:
    """The probe's harmful scores of the given row positions (``predict_proba``'s second column)."""
    return detector.predict_proba(detector.inputs(data.states[rows], data.layers))[:, 1]


def best_pair(scores: list[PairScore], select_by: str, tolerance: float = 0.0) -> PairScore:
    """The cheapest pair among those whose chosen score is within ``tolerance`` of the highest
    (``held_out`` falls back to ``val`` when undefined).

    Cheapest means the shallowest deepest block, since a check's forward stops there; among equally
    cheap pairs the higher score wins, then sweep order (shallower fusion, then safety layer).
    """
    key = "held_out_auroc" if select_by == "held_out" else "val_auroc"
    if all(np.isnan(getattr(s, key)) for s in scores):
        key = "val_auroc"
    scored = [s for s in scores if not np.isnan(getattr(s, key))]
    if not scored:
        return scores[0]
    top = max(getattr(s, key) for s in scored)

    def cost_then_score(s: PairScore) -> tuple[int, float]:
        return max(s.fusion_layer, s.safety_layer), -getattr(s, key)

    # min keeps the first of equal keys, so exact ties still go by sweep order.
    return min((s for s in scored if getattr(s, key) >= top - tolerance), key=cost_then_score)


def score_matrix(scores: list[PairScore], layers: tuple[int, ...], key: str) -> np.ndarray:
    """``(fusion, safety)`` matrix of one score, NaN where a pair is missing."""
    matrix = np.full((len(layers), len(layers)), np.nan)
    for s in scores:
        matrix[layers.index(s.fusion_layer), layers.index(s.safety_layer)] = getattr(s, key)
    return matrix


def resolve_layers(
    fusion_layer: int | str, safety_layer: int | str, select_by: str, sweep: Path, tolerance: float = 0.0
) -> tuple[int, int]:
    """The layers to train at: fixed ones as given, ``best`` ones from the sweep results in ``sweep``
    (:func:`best_pair` with ``tolerance``).

    A layer fixed beside a ``best`` one restricts the choice to swept pairs that have it.
    """
    if fusion_layer != LAYER_CHOICE and safety_layer != LAYER_CHOICE:
        return int(fusion_layer), int(safety_layer)
    require(sweep, "'dvc repro sweep' (no layer sweep to take 'best' layers from)")
    try:
        scores = [PairScore(**row) for row in json.loads(sweep.read_text(encoding="utf-8"))["pairs"]]
    except (KeyError, TypeError) as error:  # written by another version (keys renamed or missing)
        raise SweepError(f"{sweep}: layer pairs of another version ({error}); rerun the sweep stage") from error
    allowed = [
        s
        for s in scores
        if fusion_layer in (LAYER_CHOICE, s.fusion_layer) and safety_layer in (LAYER_CHOICE, s.safety_layer)
    ]
    if not allowed:
        raise SweepError(f"{sweep}: no swept pair has fusion layer {fusion_layer} and safety layer {safety_layer}")
    best = best_pair(allowed, select_by, tolerance)
    return best.fusion_layer, best.safety_layer
