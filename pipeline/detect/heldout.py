"""Held-out-source machinery shared by the layer sweep, calibration and the evaluation.

A *setting* names which index rows train, validate, calibrate and test. In-source, those are the
index's own splits. Held out, one source is left out: a detector trains, picks its epoch and its
threshold on the other sources only, and is scored on the held-out source's rows, as a request
from a new source will be.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.config import VARIANTS, TrainConfig
from pipeline.detect.detector import (
    LSI,
    PLAIN,
    Detector,
    LSIDetector,
    choose_plain_layer,
    fit_linear,
    pieces_for,
)
from pipeline.detect.features import (
    InMemoryFeatures,
    LSIFeatures,
    features_from_states,
    rows_in_order,
    store_positions,
)
from pipeline.detect.probe import LSIProbe, train_probe
from pipeline.detect.store import ActivationStore
from pipeline.errors import LSIGuardError


class HeldOutError(LSIGuardError, ValueError):
    """An index whose sources cannot give held-out-source scores (one source, or one label without a source)."""


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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
    return EvalData(index, states, layers, None if refusal is None else refusal[positions])


def in_source_setting(index: pl.DataFrame) -> Setting:
    """The index's own splits."""
    split = index["split"].to_numpy()
    return Setting("in_source", *(np.flatnonzero(split == s) for s in ("train", "val", "calib", "test")))


def held_out_setting(index: pl.DataFrame, source: str) -> Setting:
    """Train, validate and calibrate on every other source's splits; test on ``source``'s test split."""
    split, sources = index["split"].to_numpy(), index["source"].to_numpy()
    other = sources != source

    def rows(name: str, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero((split == name) & mask)

    return Setting(
        f"held_out:{source}", rows("train", other), rows("val", other), rows("calib", other), rows("test", ~other)
    )


def two_class_sources(index: pl.DataFrame) -> list[str]:
    """Sources holding both labels (their held-out AUROC is defined)."""
    counts = index.group_by("source").agg(pl.col("label").n_unique().alias("labels"))
    return sorted(counts.filter(pl.col("labels") == 2)["source"].to_list())


def fit_lsi(data: EvalData, setting: Setting, config: TrainConfig, lf: int, ls: int) -> LSIProbe:
    """The LSI probe trained on the setting's train rows, its epoch chosen on the val rows."""
    labels = data.labels
    train = InMemoryFeatures(data.lsi(setting.train, lf, ls), labels[setting.train])
    val = InMemoryFeatures(data.lsi(setting.val, lf, ls), labels[setting.val])
    probe, _ = train_probe(train, val, config, progress=False)
    return probe


def fit_detector(data: EvalData, setting: Setting, name: str, config: TrainConfig, lf: int, ls: int) -> Detector:
    """Detector ``name`` (:data:`pipeline.detect.detector.DETECTORS`) fitted on the setting's train rows.

    LSI picks its epoch on the val rows, ``logreg_plain`` its layer; ``lf`` / ``ls`` are the
    fusion and safety layers of LSI and of the regressions on its inputs.
    """
    if name == LSI:
        return LSIDetector(fit_lsi(data, setting, config, lf, ls), lf, ls)
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
    return fit_linear(name, pieces, data.states[setting.train], data.layers, labels[setting.train], config.seed)


def held_out_scores(data: EvalData, rows: np.ndarray, name: str, config: TrainConfig, lf: int, ls: int) -> np.ndarray:
    """Scores of ``rows`` by detector ``name``, each from a detector fitted without the row's source.

    Cross-fitted by source: a threshold set on these scores is set the way requests from a new
    source will score, not the way the training sources do.
    """
    sources = data.index["source"].to_numpy()
    if len(set(sources)) < 2:
        raise HeldOutError("held-out-source scores need at least two sources in the index")
    labels, scores = data.labels, np.empty(len(rows), dtype=np.float64)
    for source in sorted(set(sources[rows])):
        setting = held_out_setting(data.index, source)
        if len(np.unique(labels[setting.train])) < 2:
            raise HeldOutError(f"without source {source!r} the training rows hold one label only")
        mine = sources[rows] == source
        scores[mine] = data.scores(fit_detector(data, setting, name, config, lf, ls), rows[mine])
    return scores
