"""Standardised L2 logistic regressions (scikit-learn): fitted, scored, folded over raw inputs, and used to
choose the plain request's layer."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler


def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0, max_iter: int = 2000) -> Pipeline:
    """A standardised L2 logistic regression (scikit-learn), fitted."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    return model.fit(train_x, train_y)


def positive_scores(model: Pipeline, x: np.ndarray) -> np.ndarray:
    """Probability of the harmful class."""
    return model.predict_proba(x)[:, 1]


def folded(model: Pipeline) -> tuple[np.ndarray, float]:
    """The weight vector and bias over raw inputs of a fitted :func:`fit_logistic` pipeline.

    ``coef . (x - mean) / scale + b`` is ``(coef / scale) . x + (b - coef . mean / scale)``.
    """
    scaler, regression = model.steps[0][1], model.steps[1][1]
    coef = regression.coef_[0] / scaler.scale_
    return coef.astype(np.float64), float(regression.intercept_[0] - coef @ scaler.mean_)


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
