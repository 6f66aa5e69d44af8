"""Held-out machinery shared by the layer sweep, calibration and the evaluation.

A *setting* names which index rows train, validate, calibrate and test. In-source, those are the
index's own splits. Held out, one group of rows is left out: a detector trains, picks its epoch
and its threshold on the other groups only, and is scored on the held-out group's rows, as a
request from somewhere new will be. The group is an index column (:data:`HELD_OUT_BY`):

- ``upstream``: the project a request comes from (AdvBench, Alpaca, our demo sets...), with every
  row derived from it in every presentation. Requests cut from one pool and dressed in different
  wrappers are siblings, not strangers; this grouping keeps siblings on one side of the fold.
- ``presentation``: how a request is shown (a plain question or imperative, one of our wrappers,
  typed into an image...), whatever its upstream.
- ``source``: the source file a row was read from.

The folds are scikit-learn's :class:`~sklearn.model_selection.LeaveOneGroupOut`, intersected with
the index's splits. A group of one label (an upstream of harmful requests only) is scored
against the other groups' held-out rows of the other label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from sklearn.model_selection import LeaveOneGroupOut

from pipeline.config import HELD_OUT_BY, VARIANTS, TrainConfig
from pipeline.config.pooling import LAST
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
    feature_view,
    features_from_states,
    rows_in_order,
    store_positions,
)
from pipeline.detect.logistic import choose_plain_layer
from pipeline.detect.store import ActivationStore
from pipeline.errors import LSIGuardError


class HeldOutError(LSIGuardError, ValueError):
    """An index whose groups cannot give held-out scores (one group, or one label without a group)."""


@dataclass(frozen=True, kw_only=True)
class EvalData:
    """Every index row's label, source, text and stored states ``(n, framings, layers, hidden)``, in index order.

    ``refusal`` holds the training-free refusal-direction score per row, when it was computed.
    ``states`` are the store's feature states under its ``pooling`` (``both``: ``2 * hidden`` wide;
    :func:`~pipeline.detect.features.feature_view`); the detectors fitted here read that pooling.
    """

    index: pl.DataFrame
    states: np.ndarray
    layers: tuple[int, ...]
    refusal: np.ndarray | None = None
    pooling: str = LAST

    @property
    def labels(self) -> np.ndarray:
        return self.index["label"].to_numpy().astype(np.int64)

    def lsi(self, rows: np.ndarray, fusion_layer: int, safety_layer: int) -> LSIFeatures:
        """LSI features of the given row positions."""
        return features_from_states(self.states[rows], self.layers, fusion_layer, safety_layer)

    def plain(self, rows: np.ndarray, layer: int) -> np.ndarray:
        """The plain request's feature (last-token state under ``last`` pooling) at ``layer``."""
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
    states = rows_in_order(feature_view(store, list(layers)), positions, store.path)
    return EvalData(
        index=index,
        states=states,
        layers=layers,
        refusal=None if refusal is None else refusal[positions],
        pooling=store.provenance.pooling,
    )


def in_source_setting(index: pl.DataFrame) -> Setting:
    """The index's own splits."""
    split = index["split"].to_numpy()
    rows = {role: np.flatnonzero(split == role) for role in ("train", "val", "calib", "test")}
    return Setting(name="in_source", **rows)


@dataclass(frozen=True, kw_only=True)
class GroupFold:
    """One leave-one-group-out fold: the index column grouped ``by``, the held-out ``group``, the positions
    of every other group's rows (``others``) and of its own (``own``), both ascending (index order)."""

    by: str
    group: str
    others: np.ndarray
    own: np.ndarray

    def split_rows(self, index: pl.DataFrame, split: str, own: bool = False) -> np.ndarray:
        """Positions of the fold's rows (the other groups', or with ``own`` the group's) in index split ``split``."""
        rows = self.own if own else self.others
        return rows[index["split"].to_numpy()[rows] == split]

    def scored_rows(self, index: pl.DataFrame, split: str) -> np.ndarray:
        """The rows a detector fitted without the group is scored on, in index split ``split``.

        The group's own rows; and when they hold one label only (an upstream of harmful requests,
        say), the other groups' rows of the other label in the same split, which no detector of
        the fold trains on either. A group's AUROC is then how its requests rank against the
        other label, and its flagged share at a threshold is its recall or its false-positive rate.
        """
        own = self.split_rows(index, split, own=True)
        labels = index["label"].to_numpy()
        present = np.unique(labels[self.own])
        if len(present) != 1:
            return own
        others = self.split_rows(index, split)
        contrast = others[labels[others] != present[0]]
        return np.sort(np.concatenate([own, contrast]))


def check_held_out_by(by: str) -> None:
    """Refuse a grouping the index does not hold."""
    if by not in HELD_OUT_BY:
        raise HeldOutError(f"held-out grouping must be one of {list(HELD_OUT_BY)}, got {by!r}")


def group_folds(index: pl.DataFrame, by: str) -> list[GroupFold]:
    """One fold per distinct value of column ``by``, values sorted: scikit-learn's ``LeaveOneGroupOut``.

    An index with a single group has no fold.
    """
    check_held_out_by(by)
    if by not in index.columns:
        raise HeldOutError(f"the index has no {by!r} column; rerun the prepare stage (dvc repro prepare)")
    groups = index[by].to_numpy()
    if len(set(groups)) < 2:
        return []
    splits = LeaveOneGroupOut().split(groups, groups=groups)
    return [GroupFold(by=by, group=str(groups[own[0]]), others=others, own=own) for others, own in splits]


def group_fold(index: pl.DataFrame, by: str, group: str) -> GroupFold:
    """The fold that holds ``group`` of column ``by`` out; a :class:`HeldOutError` when there is none."""
    for fold in group_folds(index, by):
        if fold.group == group:
            return fold
    raise HeldOutError(f"no held-out fold for {by} {group!r}: the index needs it and at least one other {by}")


def fold_setting(index: pl.DataFrame, fold: GroupFold) -> Setting:
    """Train, validate and calibrate on every other group's splits; test on the group's test split
    (with the other label's held-out test rows when the group holds one label: :meth:`GroupFold.scored_rows`)."""
    train, val, calib = (fold.split_rows(index, s) for s in ("train", "val", "calib"))
    return Setting(
        name=f"held_out:{fold.group}",
        train=train,
        val=val,
        calib=calib,
        test=fold.scored_rows(index, "test"),
    )


def held_out_setting(index: pl.DataFrame, by: str, group: str) -> Setting:
    """Train, validate and calibrate without ``group`` of column ``by``; test on its test split."""
    return fold_setting(index, group_fold(index, by, group))


def scoreable_groups(index: pl.DataFrame, by: str, split: str | None = None) -> list[str]:
    """Groups of column ``by`` whose held-out AUROC is defined: with the other groups' rows of the other label
    (:meth:`GroupFold.scored_rows`), their rows hold both labels.

    ``split``: only what is scored in that index split counts (a small group may have no test rows).
    """
    labels = index["label"].to_numpy()
    folds = group_folds(index, by)
    if split is not None:
        return sorted(f.group for f in folds if len(np.unique(labels[f.scored_rows(index, split)])) == 2)
    return sorted(
        fold.group
        for fold in folds
        if len(np.unique(labels[fold.own])) == 2 or len(np.setdiff1d(labels[fold.others], labels[fold.own])) > 0
    )


def fit_lsi(data: EvalData, setting: Setting, config: TrainConfig, lf: int, ls: int) -> LSIDetector:
    """LSI trained on the setting's train rows, its epoch chosen on the val rows."""
    labels = data.labels
    detector = LSIDetector.from_config(config, lf, ls, data.pooling)
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
    pieces = pieces_for(name, data.layers, lf, ls, plain_layer)
    detector = LinearDetector(name, pieces, pooling=data.pooling, random_state=config.seed)
    return detector.fit(detector.inputs(data.states[setting.train], data.layers), labels[setting.train])


def held_out_scores(
    data: EvalData, rows: np.ndarray, name: str, config: TrainConfig, lf: int, ls: int, by: str | None = None
) -> np.ndarray:
    """Scores of ``rows`` by detector ``name``, each from a detector fitted without the row's group.

    Cross-fitted by the index column ``by`` (``config.held_out_by`` when not given): a threshold
    set on these scores is set the way requests from a new upstream will score, not the way the
    training ones do.
    """
    by = by or config.held_out_by
    folds = group_folds(data.index, by)
    if not folds:
        raise HeldOutError(f"held-out scores need at least two values of {by!r} in the index")
    labels, scores = data.labels, np.empty(len(rows), dtype=np.float64)
    for fold in folds:
        mine = np.isin(rows, fold.own)
        if not mine.any():
            continue
        setting = fold_setting(data.index, fold)
        if len(np.unique(labels[setting.train])) < 2:
            raise HeldOutError(f"without {by} {fold.group!r} the training rows hold one label only")
        scores[mine] = data.scores(fit_detector(data, setting, name, config, lf, ls), rows[mine])
    return scores
