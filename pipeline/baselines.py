"""Plain baselines every evaluation reports next to LSI, so its margin over them is visible.

LSI's probe is linear in ``[h_s, delta_h]``: a logistic regression on the same inputs is the
fair comparison. Length-only and surface-style classifiers show how much of a score could come
from how requests are written rather than what they ask.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.features import LSIFeatures


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


def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0) -> object:
    """A standardised L2 logistic regression (scikit-learn), fitted."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return model.fit(train_x, train_y)


def positive_scores(model: object, x: np.ndarray) -> np.ndarray:
    """Probability of the harmful class."""
    return model.predict_proba(x)[:, 1]  # type: ignore[attr-defined]
