"""Held-out-source machinery shared by the layer sweep, calibration and the evaluation.

A *setting* names which index rows train, validate, calibrate and test. In-source, those are the
index's own splits. Held out, one source is left out: a detector trains, picks its epoch and its
threshold on the other sources only, and is scored on the held-out source's rows, as a request
from a new source will be. The held-out folds are scikit-learn's
:class:`~sklearn.model_selection.LeaveOneGroupOut` with the source as the group, intersected with
the index's splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from sklearn.model_selection import LeaveOneGroupOut

from pipeline.config import VARIANTS, TrainConfig
from pipeline.detect.detector import (
    LSI,
    PLAIN,
    Detector,
    LinearDetector,
    LSIDetector,
    pieces_for,
)
from pipeline.detect.features import (
    LSIFeatures,
    features_from_states,
    rows_in_order,
    store_positions,
)
from pipeline.detect.logistic import choose_plain_layer
from pipeline.detect.store import ActivationStore
from pipeline.errors import LSIGuardError


class HeldOutError(LSIGuardError, ValueError):
    """An index whose sources cannot give held-out-source scores (one source, or one label without a source)."""


@dataclass(frozen=True, kw_only=True)
class EvalData:
    """Every index row's label, source, text and stored states ``(n, framings, layers, hidden)``, in index order.

    ``refusal`` holds the training-free refusal-direction score per row, when it was computed.
    """

    index: pl.DataFrame
    states: np.ndarray
    layers: tuple[int, ...]
    refusal: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        return self.index["label"].to_numpy().astype(np.int64)

    def lsi(self, rows: np.ndarray, fusion_layer: int, safety_layer: int) -> LSIFeatures:
        """LSI features of the given row positions."""
        return features_from_states(self.states[rows], self.layers, fusion_layer, safety_layer)

    def plain(self, rows: np.ndarray, layer: int) -> np.ndarray:
        """The plain request's last-token state at ``layer``."""
        return self.states[rows, VARIANTS.index("plain"), self.layers.index(layer)]

    def texts(self, rows: np.ndarray) -> list[str]:
        return [self.index["text"][int(i)] for i in rows]

    def scores(self, detector: Detector, rows: np.ndarray) -> np.ndarray:
        """A detector's harmful scores of the given row positions."""
        return detector.score_states(self.states[rows], self.layers)


@dataclass(frozen=True, kw_only=True)
class Setting:
    """Row positions (into :class:`EvalData`) of each role."""

    name: str
    train: np.ndarray
    val: np.ndarray
    calib: np.ndarray
    test: np.ndarray


def load_eval_data(index: pl.DataFrame, store: ActivationStore, refusal: np.ndarray | None = None) -> EvalData:
    """Every index row's stored states (all framings and layers) in index order.

    ``store`` is opened by the caller, with the provenance it expects
    (:func:`~pipeline.detect.provenance.open_store`); every shard read is checked against its
    checksums. ``refusal``: per-store-row refusal-direction scores, reordered here to the index's order.
    """
    positions = store_positions(store, index["row_id"].to_numpy())
    layers = tuple(store.provenance.layers)
    states = rows_in_order(store.layer_states(list(layers)), positions, store.path)
    return EvalData(
        index=index, states=states, layers=layers, refusal=None if refusal is None else refusal[positions]
    )


def in_source_setting(index: pl.DataFrame) -> Setting:
    """The index's own splits."""
    split = index["split"].to_numpy()
    rows = {role: np.flatnonzero(split == role) for role in ("train", "val", "calib", "test")}
    return Setting(name="in_source", **rows)


@dataclass(frozen=True)
class SourceFold:
    """One leave-one-source-out fold: the held-out ``source``, the positions of every other source's rows
    (``others``) and of its own (``own``), both ascending (index order)."""

    source: str
    others: np.ndarray
    own: np.ndarray

    def split_rows(self, index: pl.DataFrame, split: str, own: bool = False) -> np.ndarray:
        """Positions of the fold's rows (the other sources', or with ``own`` the source's) in index split ``split``."""
        rows = self.own if own else self.others
        return rows[index["split"].to_numpy()[rows] == split]


def source_folds(index: pl.DataFrame) -> list[SourceFold]:
    """One fold per source, sources sorted: scikit-learn's ``LeaveOneGroupOut`` with the source as the group.

    An index of one source has no fold.
    """
    sources = index["source"].to_numpy()
    if len(set(sources)) < 2:
        return []
    splits = LeaveOneGroupOut().split(sources, groups=sources)
    return [SourceFold(str(sources[own[0]]), others, own) for others, own in splits]


def source_fold(index: pl.DataFrame, source: str) -> SourceFold:
    """The fold that holds ``source`` out; an index without it, or with it alone, is a :class:`HeldOutError`."""
    for fold in source_folds(index):
        if fold.source == source:
            return fold
    raise HeldOutError(f"no held-out fold for source {source!r}: the index needs it and at least one other source")


def fold_setting(index: pl.DataFrame, fold: SourceFold) -> Setting:
    """Train, validate and calibrate on every other source's splits; test on the held-out source's test split."""
    train, val, calib = (fold.split_rows(index, s) for s in ("train", "val", "calib"))
    return Setting(
        name=f"held_out:{fold.source}",
        train=train,
        val=val,
        calib=calib,
        test=fold.split_rows(index, "test", own=True),
    )


def held_out_setting(index: pl.DataFrame, source: str) -> Setting:
    """Train, validate and calibrate on every other source's splits; test on ``source``'s test split."""
    return fold_setting(index, source_fold(index, source))


def two_class_sources(index: pl.DataFrame) -> list[str]:
    """Sources holding both labels (their held-out AUROC is defined)."""
    counts = index.group_by("source").agg(pl.col("label").n_unique().alias("labels"))
    return sorted(counts.filter(pl.col("labels") == 2)["source"].to_list())


def fit_lsi(data: EvalData, setting: Setting, config: TrainConfig, lf: int, ls: int) -> LSIDetector:
    """LSI trained on the setting's train rows, its epoch chosen on the val rows."""
    labels = data.labels
    detector = LSIDetector.from_config(config, lf, ls)
    return detector.fit(
        detector.inputs(data.states[setting.train], data.layers),
        labels[setting.train],
        X_val=detector.inputs(data.states[setting.val], data.layers),
        y_val=labels[setting.val],
    )


def fit_detector(data: EvalData, setting: Setting, name: str, config: TrainConfig, lf: int, ls: int) -> Detector:
    """Detector ``name`` (:data:`pipeline.detect.detector.DETECTORS`) fitted on the setting's train rows.

    LSI picks its epoch on the val rows, ``logreg_plain`` its layer; ``lf`` / ``ls`` are the
    fusion and safety layers of LSI and of the regressions on its inputs.
    """
    if name == LSI:
        return fit_lsi(data, setting, config, lf, ls)
    labels = data.labels
    plain_layer = None
    if name == PLAIN:
        plain_layer, _ = choose_plain_layer(
            {k: data.plain(setting.train, k) for k in data.layers},
            labels[setting.train],
            {k: data.plain(setting.val, k) for k in data.layers},
            labels[setting.val],
            seed=config.seed,
        )
    detector = LinearDetector(name, pieces_for(name, data.layers, lf, ls, plain_layer), random_state=config.seed)
    return detector.fit(detector.inputs(data.states[setting.train], data.layers), labels[setting.train])


def held_out_scores(data: EvalData, rows: np.ndarray, name: str, config: TrainConfig, lf: int, ls: int) -> np.ndarray:
    """Scores of ``rows`` by detector ``name``, each from a detector fitted without the row's source.

    Cross-fitted by source: a threshold set on these scores is set the way requests from a new
    source will score, not the way the training sources do.
    """
    folds = source_folds(data.index)
    if not folds:
        raise HeldOutError("held-out-source scores need at least two sources in the index")
    labels, scores = data.labels, np.empty(len(rows), dtype=np.float64)
    for fold in folds:
        mine = np.isin(rows, fold.own)
        if not mine.any():
            continue
        setting = fold_setting(data.index, fold)
        if len(np.unique(labels[setting.train])) < 2:
            raise HeldOutError(f"without source {fold.source!r} the training rows hold one label only")
        scores[mine] = data.scores(fit_detector(data, setting, name, config, lf, ls), rows[mine])
    return scores
