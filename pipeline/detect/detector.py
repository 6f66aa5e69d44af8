"""The detectors a guard can ship: the LSI probe, and linear probes on the states LSI reads.

Every detector maps a request's feature states under the three framings (benign, malicious,
plain) at stored layers to a logit; ``sigmoid(logit)`` is its harmful score. A framing's feature is
what its ``pooling`` (:mod:`pipeline.config.pooling`) says: the last token's state (the method's
read), the mean over the request's own tokens, or both concatenated, so ``h_s`` and ``delta_h``
below are pooled features; the detector records its pooling, and the guard computes the same. Besides LSI, the
candidates are logistic regressions (standardised, L2) on:

- ``logreg_plain``: the plain request's state at one layer, chosen on validation rows;
- ``logreg_plain_all``: the plain request's states at every stored layer, concatenated;
- ``logreg_hs_delta``: ``[h_s, delta_h]``, the inputs LSI's probe is linear in;
- ``logreg_hs``: ``h_s`` alone (benign framing at the safety layer);
- ``logreg_delta``: ``delta_h`` alone (malicious minus benign framing at the fusion layer).

Each detector is a scikit-learn classifier (``fit`` / ``predict_proba`` / ``decision_function`` /
``predict``, ``get_params`` / ``set_params``) whose X is the states it reads side by side
(``inputs``). A fitted regression is folded into one weight vector and bias over the raw states
(:class:`LinearDetector`), so the guard, the explanations and the saved file need no
scikit-learn object, and nothing is pickled.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import Tags
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.config import VARIANTS, TrainConfig, pooling_reads
from pipeline.config.pooling import LAST
from pipeline.detect.features import FeatureSource, InMemoryFeatures, LSIFeatures
from pipeline.detect.logistic import fit_logistic, folded
from pipeline.detect.pieces import Piece, StateGetter, getter_from_states, piece_inputs
from pipeline.detect.probe import LSIProbe, train_probe

LSI = "lsi"
PLAIN, PLAIN_ALL = "logreg_plain", "logreg_plain_all"
HS_DELTA, HS_ONLY, DELTA_ONLY = "logreg_hs_delta", "logreg_hs", "logreg_delta"
LINEAR_DETECTORS: tuple[str, ...] = (PLAIN, PLAIN_ALL, HS_DELTA, HS_ONLY, DELTA_ONLY)
DETECTORS: tuple[str, ...] = (LSI, *LINEAR_DETECTORS)


class BinaryDetector(ClassifierMixin, BaseEstimator, metaclass=ABCMeta):
    """What every detector is to scikit-learn: a binary classifier whose positive logits predict ``classes_[1]``."""

    classes_: np.ndarray

    @abstractmethod
    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits of the rows of X."""

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The class of positive logits is ``classes_[1]``."""
        positive = self.decision_function(X) > 0  # first: an unfitted detector raises NotFittedError
        return self.classes_[positive.astype(np.int64)]

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags


class LinearDetector(BinaryDetector):
    """``logit = x @ coef_ + intercept_`` over the pieces' states, concatenated in order.

    A scikit-learn classifier. Hyperparameters: ``name`` (one of :data:`LINEAR_DETECTORS`),
    ``pieces`` (the input blocks, in order), ``random_state`` and ``max_iter`` of the logistic
    regression. ``fit(X, y)`` takes X as the pieces' states side by side (:meth:`inputs`) and
    learns its width, ``n_features_in_``; reading states (:meth:`logits`) then requires the
    pieces' widths to sum to it, which fixes the hidden size at ``n_features_in_ / len(pieces)``.
    The standardised L2 regression (:func:`~pipeline.detect.logistic.fit_logistic`) is folded into
    ``coef_`` (float32, one row) and ``intercept_`` over the raw states, so the guard, the
    explanations and the saved file need no scikit-learn object, and nothing is pickled. Scores are
    computed in float32 with torch, as the guard computes them.
    """

    def __init__(
        self,
        name: str = PLAIN,
        pieces: Sequence[Piece] = (),
        *,
        pooling: str = LAST,
        random_state: int = 0,
        max_iter: int = 2000,
    ):
        self.name = name
        self.pieces = pieces
        self.pooling = pooling
        self.random_state = random_state
        self.max_iter = max_iter

    @classmethod
    def from_weights(
        cls, name: str, pieces: Sequence[Piece], weight: np.ndarray, bias: float, pooling: str = LAST
    ) -> LinearDetector:
        """A fitted detector from folded weights (a saved detector), without fitting."""
        detector = cls(name, tuple(pieces), pooling=pooling)
        detector._check_recipe()
        coef = np.asarray(weight, dtype=np.float32).reshape(1, -1)
        detector._set_weights(coef, float(bias), np.array([0, 1]))
        return detector

    def _check_recipe(self) -> None:
        if self.name not in LINEAR_DETECTORS:
            raise ValueError(f"unknown linear detector {self.name!r}; expected one of {', '.join(LINEAR_DETECTORS)}")
        if not self.pieces:
            raise ValueError("a linear detector needs at least one state piece")
        pooling_reads(self.pooling)

    def _set_weights(self, coef: np.ndarray, bias: float, classes: np.ndarray) -> None:
        # float32 like the saved file (pipeline.detect.shipped), so a loaded detector scores exactly as the fitted one.
        self.coef_, self.intercept_, self.classes_ = coef, np.array([bias], dtype=np.float32), classes
        self.n_features_in_ = coef.shape[1]

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearDetector:
        """Fit the standardised L2 logistic regression on X (:meth:`inputs`) and fold it over raw states."""
        self._check_recipe()
        X, y = validate_data(self, X, y)
        _check_binary(y)
        model = fit_logistic(X, y, seed=self.random_state, max_iter=self.max_iter)
        weight, bias = folded(model)
        self._set_weights(weight.astype(np.float32).reshape(1, -1), bias, model.classes_)
        self.n_iter_ = model[-1].n_iter_
        return self

    def inputs(self, states: np.ndarray, layers: Sequence[int], variants: Sequence[str] = VARIANTS) -> np.ndarray:
        """X for :meth:`fit` and the scikit-learn methods: the pieces of states ``(n, framings, layers, hidden)``."""
        return piece_inputs(self.pieces, getter_from_states(states, layers, variants)).numpy()

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

    @property
    def reads(self) -> tuple[str, ...]:
        """What the detector's pooling reads of each framing's prompt (last token first)."""
        return pooling_reads(self.pooling)

    def describe(self) -> str:
        return _pooled(f"{self.name} on {', '.join(p.label() for p in self.pieces)}", self.pooling)

    def _logit(self, x: torch.Tensor) -> torch.Tensor:
        check_is_fitted(self)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"{self.describe()}: expects {self.n_features_in_} input features, got {x.shape[1]}")
        # In float64, rounded to float32 only at the end (:meth:`_rounded`): in float32 a row's
        # logit and score move in their last digit with the rows beside it (the matrix product's
        # summation order and the vectorised sigmoid's scalar tail depend on the batch).
        coef = torch.from_numpy(self.coef_[0]).to(device=x.device, dtype=torch.float64)
        return x.double() @ coef + float(self.intercept_[0])

    @staticmethod
    def _rounded(values: torch.Tensor) -> np.ndarray:
        return values.float().numpy()

    def logits(self, get: StateGetter) -> torch.Tensor:
        """Logits ``(n,)``; differentiable in the states ``get`` returns."""
        x = piece_inputs(self.pieces, get)
        return self._logit(x).to(x.dtype)

    def score_states(self, states: np.ndarray, layers: Sequence[int], variants: Sequence[str] = VARIANTS) -> np.ndarray:
        """Harmful scores of states ``(n, framings, layers, hidden)`` (framings named by ``variants``)."""
        with torch.no_grad():
            x = piece_inputs(self.pieces, getter_from_states(states, layers, variants))
            return self._rounded(torch.sigmoid(self._logit(x)))

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits of the rows of X (float32)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        with torch.no_grad():
            return self._rounded(self._logit(_tensor(X)))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``[1 - s, s]`` per row, ``s = sigmoid(logit)`` the harmful score (float32)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        with torch.no_grad():
            return _two_columns(self._rounded(torch.sigmoid(self._logit(_tensor(X)))))


# The TrainConfig fields LSI training reads (train_probe), besides the two layers.
TRAINING_FIELDS: tuple[str, ...] = (
    "alpha",
    "lr",
    "batch_size",
    "epochs",
    "grad_clip",
    "init_gain",
    "seed",
    "standardize",
    "weight_decay",
    "class_weight",
)


class LSIDetector(BinaryDetector):
    """The LSI probe at its fusion and safety layers, as a scikit-learn classifier behind the detectors' interface.

    Hyperparameters: the two layers, the pooling of the features it reads, and the training fields
    of :class:`~pipeline.config.TrainConfig` (:data:`TRAINING_FIELDS`, same defaults). X is
    ``[h_s, delta_h]`` side by side (:meth:`inputs`), so its width is twice the feature width
    (the hidden size, twice it under ``both`` pooling). Fitting runs :func:`~pipeline.detect.probe.train_probe`;
    the trained :class:`~pipeline.detect.probe.LSIProbe` is ``probe_`` and its epochs ``history_``.
    """

    name = LSI
    variants: tuple[str, ...] = ("benign", "malicious")

    def __init__(
        self,
        *,
        fusion_layer: int = 12,
        safety_layer: int = 3,
        alpha: float = TrainConfig.alpha,
        lr: float = TrainConfig.lr,
        batch_size: int = TrainConfig.batch_size,
        epochs: int = TrainConfig.epochs,
        grad_clip: float = TrainConfig.grad_clip,
        init_gain: float = TrainConfig.init_gain,
        seed: int = TrainConfig.seed,
        standardize: bool = TrainConfig.standardize,
        weight_decay: float = TrainConfig.weight_decay,
        class_weight: str = TrainConfig.class_weight,
        pooling: str = LAST,
    ) -> None:
        self.fusion_layer, self.safety_layer = fusion_layer, safety_layer
        self.pooling = pooling
        self.alpha, self.init_gain = alpha, init_gain
        self.lr, self.weight_decay, self.grad_clip = lr, weight_decay, grad_clip
        self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
        self.standardize, self.class_weight = standardize, class_weight

    @classmethod
    def from_config(cls, config: TrainConfig, fusion_layer: int, safety_layer: int, pooling: str = LAST) -> LSIDetector:
        """An unfitted detector training as ``config`` says, at the given layers, on features pooled by ``pooling``."""
        fields = {k: getattr(config, k) for k in TRAINING_FIELDS}
        return cls(fusion_layer=fusion_layer, safety_layer=safety_layer, pooling=pooling, **fields)

    @classmethod
    def from_probe(cls, probe: LSIProbe, fusion_layer: int, safety_layer: int, pooling: str = LAST) -> LSIDetector:
        """A fitted detector around a trained probe (a saved one), without fitting."""
        pooling_reads(pooling)
        detector = cls(fusion_layer=fusion_layer, safety_layer=safety_layer, alpha=probe.alpha, pooling=pooling)
        detector._set_probe(probe, np.array([0, 1]))
        return detector

    @property
    def reads(self) -> tuple[str, ...]:
        """What the detector's pooling reads of each framing's prompt (last token first)."""
        return pooling_reads(self.pooling)

    def _set_probe(self, probe: LSIProbe, classes: np.ndarray) -> None:
        self.probe_, self.classes_ = probe, classes
        self.n_features_in_ = 2 * probe.projector.in_features

    def training_config(self) -> TrainConfig:
        """The :class:`~pipeline.config.TrainConfig` training runs under (validated there)."""
        fields = {k: getattr(self, k) for k in TRAINING_FIELDS}
        return TrainConfig(fusion_layer=self.fusion_layer, safety_layer=self.safety_layer, **fields)

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        X_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
        progress: bool = False,
    ) -> LSIDetector:
        """Train on ``[h_s, delta_h]`` rows; the epoch kept is the one with the best AUROC on the validation rows.

        Without ``X_val`` / ``y_val`` the training rows are the validation rows too: the epoch is
        chosen by training AUROC (then loss). Labels must hold exactly two classes; the second of
        ``classes_`` is the harmful one.
        """
        X, y = validate_data(self, X, y)
        _check_binary(y)
        classes, encoded = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError("LSI needs both classes in training, got one class")
        train = InMemoryFeatures(self._features(X), encoded.astype(np.int64))
        if (X_val is None) != (y_val is None):
            raise ValueError("give both X_val and y_val, or neither")
        val = train
        if X_val is not None and y_val is not None:
            X_val = validate_data(self, X_val, reset=False)
            y_val = np.asarray(y_val)
            if not np.isin(y_val, classes).all():
                unseen = sorted(set(y_val.tolist()) - set(classes.tolist()))
                raise ValueError(f"validation labels {unseen} are not among the training classes")
            val = InMemoryFeatures(self._features(X_val), np.searchsorted(classes, y_val).astype(np.int64))
        self.fit_sources(train, val, progress)
        self.classes_ = classes
        return self

    def fit_sources(self, train: FeatureSource, val: FeatureSource, progress: bool = False) -> LSIDetector:
        """Train from feature sources read a chunk at a time (a store larger than memory), labels 0 / 1."""
        pooling_reads(self.pooling)
        probe, history = train_probe(train, val, self.training_config(), progress)
        self._set_probe(probe, np.array([0, 1]))
        self.history_ = history
        return self

    def _features(self, X: np.ndarray) -> LSIFeatures:
        if X.shape[1] % 2:
            raise ValueError(f"LSI reads [h_s, delta_h] side by side: needs an even width, got {X.shape[1]} feature(s)")
        hidden = X.shape[1] // 2
        return LSIFeatures(X[:, :hidden], X[:, hidden:])

    def inputs(self, states: np.ndarray, layers: Sequence[int], variants: Sequence[str] = VARIANTS) -> np.ndarray:
        """X for the scikit-learn methods: ``[h_s, delta_h]`` of states ``(n, framings, layers, hidden)``."""
        get = getter_from_states(states, layers, variants)
        return torch.cat([get("benign", self.safety_layer), get("delta", self.fusion_layer)], dim=1).numpy()

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({self.fusion_layer, self.safety_layer}))

    def describe(self) -> str:
        return _pooled(f"LSI at fusion layer {self.fusion_layer} / safety layer {self.safety_layer}", self.pooling)

    def logits(self, get: StateGetter) -> torch.Tensor:
        """Logits ``(n,)``; differentiable in the states ``get`` returns."""
        check_is_fitted(self)
        self.probe_.eval()
        return self.probe_(get("benign", self.safety_layer), get("delta", self.fusion_layer))

    def score_states(self, states: np.ndarray, layers: Sequence[int], variants: Sequence[str] = VARIANTS) -> np.ndarray:
        """Harmful scores of states ``(n, framings, layers, hidden)`` (framings named by ``variants``)."""
        with torch.no_grad():
            return torch.sigmoid(self.logits(getter_from_states(states, layers, variants))).numpy()

    def _checked_features(self, X: np.ndarray) -> LSIFeatures:
        check_is_fitted(self)
        return self._features(validate_data(self, X, reset=False))

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits of the ``[h_s, delta_h]`` rows of X (float32)."""
        features = self._checked_features(X)
        self.probe_.eval()
        with torch.inference_mode():
            return self.probe_(torch.from_numpy(features.h_s), torch.from_numpy(features.delta_h)).numpy()

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``[1 - s, s]`` per row, ``s`` the probe's harmful score (float32)."""
        features = self._checked_features(X)
        return _two_columns(self.probe_.score(features))


Detector = LSIDetector | LinearDetector


def _pooled(description: str, pooling: str) -> str:
    """A detector's description, naming its pooling unless it is the method's last-token read."""
    return description if pooling == LAST else f"{description} ({pooling} pooling)"


def _check_binary(y: np.ndarray) -> None:
    """Refuse continuous labels and more than two classes (the detectors score one harmful class)."""
    check_classification_targets(y)
    kind = type_of_target(y)
    if kind != "binary":
        raise ValueError(f"Only binary classification is supported. The type of the target is {kind}.")


def _tensor(X: np.ndarray) -> torch.Tensor:
    """X as a writable C-ordered float32 tensor (a read-only input is copied: torch needs writable memory)."""
    return torch.from_numpy(np.require(X, dtype=np.float32, requirements=["C", "W"]))


def _two_columns(scores: np.ndarray) -> np.ndarray:
    """scikit-learn's ``predict_proba`` layout of harmful scores: ``[1 - s, s]``."""
    return np.stack([1 - scores, scores], axis=1)


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
