"""The detectors a guard can ship: the LSI probe, and linear probes on the states LSI reads.

Every detector maps a request's last-token states under the three framings (benign, malicious,
plain) at stored layers to a logit; ``sigmoid(logit)`` is its harmful score. Besides LSI, the
candidates are logistic regressions (standardised, L2) on:

- ``logreg_plain``: the plain request's state at one layer, chosen on validation rows;
- ``logreg_plain_all``: the plain request's states at every stored layer, concatenated;
- ``logreg_hs_delta``: ``[h_s, delta_h]``, the inputs LSI's probe is linear in;
- ``logreg_hs``: ``h_s`` alone (benign framing at the safety layer);
- ``logreg_delta``: ``delta_h`` alone (malicious minus benign framing at the fusion layer).

A fitted regression is folded into one weight vector and bias over the raw states
(:class:`LinearDetector`), so the guard, the explanations and the saved file need no
scikit-learn object, and nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.config import VARIANTS
from pipeline.detect.probe import LSIProbe

LSI = "lsi"
PLAIN, PLAIN_ALL = "logreg_plain", "logreg_plain_all"
HS_DELTA, HS_ONLY, DELTA_ONLY = "logreg_hs_delta", "logreg_hs", "logreg_delta"
LINEAR_DETECTORS: tuple[str, ...] = (PLAIN, PLAIN_ALL, HS_DELTA, HS_ONLY, DELTA_ONLY)
DETECTORS: tuple[str, ...] = (LSI, *LINEAR_DETECTORS)
# A piece of a linear detector's input: a framing's state, or the malicious-minus-benign difference.
PARTS: tuple[str, ...] = (*VARIANTS, "delta")

# ``get(part, layer)``: the ``(n, hidden)`` states of one framing (or ``delta``) at one layer.
StateGetter = Callable[[str, int], torch.Tensor]


@dataclass(frozen=True)
class Piece:
    """One block of a linear detector's input: ``part`` (a framing or ``delta``) at ``layer``."""

    part: str
    layer: int

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"unknown state part {self.part!r}; expected one of {', '.join(PARTS)}")

    def label(self) -> str:
        return f"{self.part}@{self.layer}"

    @classmethod
    def parse(cls, text: str) -> Piece:
        """``"plain@9"`` -> ``Piece("plain", 9)``."""
        part, sep, layer = text.partition("@")
        if not sep or not layer.isdigit():
            raise ValueError(f"expected a state piece like 'plain@9', got {text!r}")
        return cls(part, int(layer))


def getter_from_states(states: np.ndarray, layers: Sequence[int], variants: Sequence[str] = VARIANTS) -> StateGetter:
    """A :data:`StateGetter` over states ``(n, framings, layers, hidden)``; ``variants`` names the framings axis."""
    layers, variants = list(layers), list(variants)
    array = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))

    def get(part: str, layer: int) -> torch.Tensor:
        at = layers.index(layer)
        if part == "delta":
            return array[:, variants.index("malicious"), at] - array[:, variants.index("benign"), at]
        return array[:, variants.index(part), at]

    return get


def piece_inputs(pieces: Sequence[Piece], get: StateGetter) -> torch.Tensor:
    """The pieces' states side by side, ``(n, sum of widths)``."""
    return torch.cat([get(p.part, p.layer) for p in pieces], dim=1)


class LinearDetector:
    """``logit = x @ weight + bias`` over the pieces' states, concatenated in order."""

    def __init__(self, name: str, pieces: Sequence[Piece], weight: np.ndarray, bias: float) -> None:
        if name not in LINEAR_DETECTORS:
            raise ValueError(f"unknown linear detector {name!r}; expected one of {', '.join(LINEAR_DETECTORS)}")
        if not pieces:
            raise ValueError("a linear detector needs at least one state piece")
        self.name = name
        self.pieces = tuple(pieces)
        self.weight = torch.from_numpy(np.asarray(weight, dtype=np.float32).reshape(-1))
        self.bias = float(bias)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({p.layer for p in self.pieces}))

    @property
    def variants(self) -> tuple[str, ...]:
        """The framings the detector reads, in store order (``delta`` reads benign and malicious)."""
        needed = {p.part for p in self.pieces if p.part != "delta"}
        if any(p.part == "delta" for p in self.pieces):
            needed |= {"benign", "malicious"}
        return tuple(v for v in VARIANTS if v in needed)

    def describe(self) -> str:
        return f"{self.name} on {', '.join(p.label() for p in self.pieces)}"

    def logits(self, get: StateGetter) -> torch.Tensor:
        """Logits ``(n,)``; differentiable in the states ``get`` returns."""
        x = piece_inputs(self.pieces, get)
        if x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"{self.describe()}: expects {self.weight.shape[0]} input features, got {x.shape[1]}")
        return x @ self.weight.to(x) + self.bias

    def score_states(self, states: np.ndarray, layers: Sequence[int], variants: Sequence[str] = VARIANTS) -> np.ndarray:
        """Harmful scores of states ``(n, framings, layers, hidden)`` (framings named by ``variants``)."""
        with torch.no_grad():
            return torch.sigmoid(self.logits(getter_from_states(states, layers, variants))).numpy()


class LSIDetector:
    """The LSI probe at its fusion and safety layers, behind the same interface."""

    name = LSI
    variants: tuple[str, ...] = ("benign", "malicious")

    def __init__(self, probe: LSIProbe, fusion_layer: int, safety_layer: int) -> None:
        self.probe = probe
        self.fusion_layer = fusion_layer
        self.safety_layer = safety_layer

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({self.fusion_layer, self.safety_layer}))

    def describe(self) -> str:
        return f"LSI at fusion layer {self.fusion_layer} / safety layer {self.safety_layer}"

    def logits(self, get: StateGetter) -> torch.Tensor:
        """Logits ``(n,)``; differentiable in the states ``get`` returns."""
        self.probe.eval()
        return self.probe(get("benign", self.safety_layer), get("delta", self.fusion_layer))

    def score_states(self, states: np.ndarray, layers: Sequence[int], variants: Sequence[str] = VARIANTS) -> np.ndarray:
        """Harmful scores of states ``(n, framings, layers, hidden)`` (framings named by ``variants``)."""
        with torch.no_grad():
            return torch.sigmoid(self.logits(getter_from_states(states, layers, variants))).numpy()


Detector = LSIDetector | LinearDetector


def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0) -> object:
    """A standardised L2 logistic regression (scikit-learn), fitted."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return model.fit(train_x, train_y)


def positive_scores(model: object, x: np.ndarray) -> np.ndarray:
    """Probability of the harmful class."""
    return model.predict_proba(x)[:, 1]  # type: ignore[attr-defined]


def folded(model: object) -> tuple[np.ndarray, float]:
    """The weight vector and bias over raw inputs of a fitted :func:`fit_logistic` pipeline.

    ``coef . (x - mean) / scale + b`` is ``(coef / scale) . x + (b - coef . mean / scale)``.
    """
    scaler, regression = model.steps[0][1], model.steps[1][1]  # type: ignore[attr-defined]
    coef = regression.coef_[0] / scaler.scale_
    return coef.astype(np.float64), float(regression.intercept_[0] - coef @ scaler.mean_)


def fit_linear(
    name: str, pieces: Sequence[Piece], states: np.ndarray, layers: Sequence[int], labels: np.ndarray, seed: int
) -> LinearDetector:
    """A :class:`LinearDetector` fitted (:func:`fit_logistic`) on states ``(n, framings, layers, hidden)``."""
    x = piece_inputs(pieces, getter_from_states(states, layers)).numpy()
    weight, bias = folded(fit_logistic(x, labels, seed=seed))
    return LinearDetector(name, pieces, weight, bias)


def pieces_for(
    name: str, layers: Sequence[int], fusion_layer: int, safety_layer: int, plain_layer: int | None = None
) -> tuple[Piece, ...]:
    """The input pieces of linear detector ``name`` (``logreg_plain`` needs ``plain_layer``)."""
    if name == PLAIN:
        if plain_layer is None:
            raise ValueError("logreg_plain needs its layer")
        return (Piece("plain", plain_layer),)
    recipes: Mapping[str, tuple[Piece, ...]] = {
        PLAIN_ALL: tuple(Piece("plain", k) for k in layers),
        HS_DELTA: (Piece("benign", safety_layer), Piece("delta", fusion_layer)),
        HS_ONLY: (Piece("benign", safety_layer),),
        DELTA_ONLY: (Piece("delta", fusion_layer),),
    }
    if name not in recipes:
        raise ValueError(f"unknown linear detector {name!r}; expected one of {', '.join(LINEAR_DETECTORS)}")
    return recipes[name]


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
