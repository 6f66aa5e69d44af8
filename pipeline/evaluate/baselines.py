"""Plain baselines every evaluation reports next to LSI, so its margin over them is visible.

LSI's probe is linear in ``[h_s, delta_h]``: a logistic regression on the same inputs is the
fair comparison, and the same regression on ``h_s`` alone or ``delta_h`` alone shows what each
half contributes. A regression on the plain (untemplated) request's state at its best layer shows
what the templates add at all. Length-only and surface-style classifiers show how much of a
score could come from how requests are written rather than what they ask.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.detect.features import LSIFeatures


def length_features(texts: Sequence[str]) -> np.ndarray:
    """Characters and words per request text."""
    return np.array([[len(t), len(t.split())] for t in texts], dtype=np.float64)


def style_features(texts: Sequence[str]) -> np.ndarray:
    """Surface style: length, word length, punctuation, capitals, digits, questions, line breaks."""
    rows = []
    for text in texts:
        words = text.split() or [""]
        rows.append(
            [
                len(text),
                len(words),
                float(np.mean([len(w) for w in words])),
                len(re.findall(r"[^\w\s]", text)) / max(len(text), 1),
                sum(c.isupper() for c in text) / max(len(text), 1),
                sum(c.isdigit() for c in text) / max(len(text), 1),
                text.count("?"),
                text.count("\n"),
            ]
        )
    return np.array(rows, dtype=np.float64)


def lsi_inputs(features: LSIFeatures) -> np.ndarray:
    """``[h_s, delta_h]``: the inputs LSI's probe is linear in."""
    return np.concatenate([features.h_s, features.delta_h], axis=1)


def hs_only_inputs(features: LSIFeatures) -> np.ndarray:
    """``h_s`` alone: the benign framing's state at the safety layer."""
    return features.h_s


def delta_only_inputs(features: LSIFeatures) -> np.ndarray:
    """``delta_h`` alone: malicious minus benign framing at the fusion layer."""
    return features.delta_h


def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0) -> object:
    """A standardised L2 logistic regression (scikit-learn), fitted."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return model.fit(train_x, train_y)


def positive_scores(model: object, x: np.ndarray) -> np.ndarray:
    """Probability of the harmful class."""
    return model.predict_proba(x)[:, 1]  # type: ignore[attr-defined]


def choose_plain_layer(
    train_by_layer: Mapping[int, np.ndarray],
    train_labels: np.ndarray,
    val_by_layer: Mapping[int, np.ndarray],
    val_labels: np.ndarray,
    seed: int = 0,
) -> tuple[int, float]:
    """The layer whose plain-framing state gives the best validation AUROC, and that AUROC.

    ``*_by_layer`` map a layer index to states ``(n, hidden)``; a logistic regression
    (:func:`fit_logistic`) is fitted on each layer's training states. Ties go to the shallower
    layer, the cheaper one to reach.
    """
    if not train_by_layer:
        raise ValueError("no layers to choose from")
    if set(train_by_layer) != set(val_by_layer):
        raise ValueError(
            f"training layers {sorted(train_by_layer)} and validation layers {sorted(val_by_layer)} differ"
        )
    for name, labels in (("training", train_labels), ("validation", val_labels)):
        if len(np.unique(labels)) != 2:
            raise ValueError(f"{name} labels must hold both classes to compare layers by AUROC")
    best_layer, best_auroc = -1, -np.inf
    for layer in sorted(train_by_layer):
        model = fit_logistic(np.asarray(train_by_layer[layer]), train_labels, seed=seed)
        auroc = float(roc_auc_score(val_labels, positive_scores(model, np.asarray(val_by_layer[layer]))))
        # Strictly better only: on a tie the shallower layer, visited first, stays.
        if auroc > best_auroc:
            best_layer, best_auroc = layer, auroc
    return best_layer, best_auroc
