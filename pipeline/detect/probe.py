"""The LSI projector and safety probe, their training, and safe persistence.

``s = sigmoid(psi(h_s + alpha * W_p(delta_h)))``. Only ``W_p`` and ``psi`` train; the model is
frozen and never seen here: training runs from stored features.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn
from tqdm import tqdm

from pipeline.config import TrainConfig, pooling_reads
from pipeline.config.pooling import LAST
from pipeline.detect.features import FeatureSource, LSIFeatures
from pipeline.run_record import HIDDEN_STATE_LIBRARIES, library_versions, warn_if_versions_differ

WEIGHTS_FILE = "probe.safetensors"
META_FILE = "probe.json"
# A key of probe.json beside ProbeMeta's fields: the versions of the libraries that computed the
# states the probe was trained on (a reader under others is warned; see pipeline.run_record).
VERSIONS_KEY = "library_versions"


class LSIProbe(nn.Module):
    """Latent safety injection: a hidden->hidden projector ``W_p`` and a hidden->1 probe ``psi``.

    Inputs are shifted and scaled by stored per-feature statistics first. They are the identity
    (mean 0, scale 1) unless training ran with ``standardize``; keeping them in the module means a
    saved probe applies them wherever it is used.
    """

    def __init__(self, hidden_size: int, alpha: float = 0.1, init_gain: float = 0.02) -> None:
        super().__init__()
        self.alpha = alpha
        self.projector = nn.Linear(hidden_size, hidden_size)
        self.probe = nn.Linear(hidden_size, 1)
        # A small projector starts the injection near zero, so the probe first reads h_s alone.
        nn.init.xavier_normal_(self.projector.weight, gain=init_gain)
        nn.init.zeros_(self.projector.bias)
        for name in ("h_s_mean", "delta_h_mean"):
            self.register_buffer(name, torch.zeros(hidden_size))
        for name in ("h_s_scale", "delta_h_scale"):
            self.register_buffer(name, torch.ones(hidden_size))

    def set_standardization(self, stats: InputStats) -> None:
        """Use training-set means and standard deviations to standardise both inputs."""
        for name, value in stats.as_tensors().items():
            getattr(self, name).copy_(value)

    def forward(self, h_s: torch.Tensor, delta_h: torch.Tensor) -> torch.Tensor:
        """Refusal logits, shape ``(n,)``."""
        h_s = (h_s - self.h_s_mean) / self.h_s_scale
        delta_h = (delta_h - self.delta_h_mean) / self.delta_h_scale
        injected = h_s + self.alpha * self.projector(delta_h)
        return self.probe(injected).squeeze(-1)

    @torch.inference_mode()
    def score(self, features: LSIFeatures) -> np.ndarray:
        """Refusal probabilities for a block of features."""
        self.eval()
        logits = self(torch.from_numpy(features.h_s), torch.from_numpy(features.delta_h))
        return torch.sigmoid(logits).numpy()

    def score_source(self, source: FeatureSource) -> np.ndarray:
        """Refusal probabilities for every row of a source, a chunk at a time, in the source's row order."""
        parts = [self.score(source.read(lo, hi)) for lo, hi in source.chunk_bounds()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


@dataclass(frozen=True, kw_only=True)
class InputStats:
    """Per-feature mean and standard deviation of ``h_s`` and ``delta_h`` over a training set."""

    h_s_mean: np.ndarray
    h_s_std: np.ndarray
    delta_h_mean: np.ndarray
    delta_h_std: np.ndarray

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The probe's buffer names and values; a constant feature keeps scale 1 instead of dividing by 0."""

        def scale(std: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.where(std > 1e-6, std, 1.0).astype(np.float32))

        return {
            "h_s_mean": torch.from_numpy(self.h_s_mean.astype(np.float32)),
            "h_s_scale": scale(self.h_s_std),
            "delta_h_mean": torch.from_numpy(self.delta_h_mean.astype(np.float32)),
            "delta_h_scale": scale(self.delta_h_std),
        }


def input_stats(source: FeatureSource) -> InputStats:
    """Means and standard deviations in one streaming pass over the chunks (float64 sums)."""
    count = 0
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    for lo, hi in source.chunk_bounds():
        chunk = source.read(lo, hi)
        for name in ("h_s", "delta_h"):
            values = getattr(chunk, name).astype(np.float64)
            sums[name] = sums.get(name, 0.0) + values.sum(axis=0)
            squares[name] = squares.get(name, 0.0) + (values**2).sum(axis=0)
        count += hi - lo
    if count == 0:
        raise ValueError("cannot standardise on an empty training set")
    mean = {name: sums[name] / count for name in sums}
    std = {name: np.sqrt(np.maximum(squares[name] / count - mean[name] ** 2, 0.0)) for name in sums}
    return InputStats(
        h_s_mean=mean["h_s"], h_s_std=std["h_s"], delta_h_mean=mean["delta_h"], delta_h_std=std["delta_h"]
    )


@dataclass(frozen=True, kw_only=True)
class EpochRecord:
    """One epoch of training, for ``dvc plots``."""

    epoch: int
    train_loss: float
    val_loss: float
    val_auroc: float


@dataclass(frozen=True, kw_only=True)
class ProbeMeta:
    """What a saved detector needs to be used correctly: which one it is, its shape and which layers feed it.

    ``detector`` is ``lsi`` or a linear probe's name (:mod:`pipeline.detect.detector`); a linear
    probe reads ``pieces`` (``"plain@9"``, ...). ``fusion_layer`` / ``safety_layer`` are LSI's pair
    (the one the candidates were compared at, for a linear probe). ``held_out_auroc`` is the mean
    held-out-source validation AUROC the detector was chosen by (None when not measured);
    ``best_epoch`` / ``best_val_auroc`` are LSI's training record (-1 / NaN for a linear probe).
    ``hidden_size`` is the model's; ``pooling`` (:mod:`pipeline.config.pooling`) is how each
    framing's states become the features the detector reads, whose width is ``hidden_size`` times
    :meth:`feature_reads` (files written before it was recorded: ``last``).
    """

    hidden_size: int
    alpha: float
    fusion_layer: int
    safety_layer: int
    best_epoch: int
    best_val_auroc: float
    store_provenance: dict[str, Any]
    detector: str = "lsi"
    pieces: list[str] = field(default_factory=list)
    held_out_auroc: float | None = None
    pooling: str = LAST

    def feature_reads(self) -> int:
        """How many reads of each framing make one feature (1, or 2 under ``both``)."""
        return len(pooling_reads(self.pooling))


def auroc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, or NaN on a one-class set (undefined there; NaN keeps that visible instead of crashing)."""
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def class_weights(labels: np.ndarray, mode: str) -> tuple[float, float]:
    """Loss weights of the benign and harmful class: ``(1, 1)``, or ``n / (2 n_c)`` when ``balanced``."""
    if mode == "none":
        return 1.0, 1.0
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)
    if (counts == 0).any():
        raise ValueError(f"class_weight 'balanced' needs both labels in training, got counts {counts.tolist()}")
    weights = len(labels) / (2.0 * counts)
    return float(weights[0]), float(weights[1])


def train_probe(
    train: FeatureSource,
    val: FeatureSource,
    config: TrainConfig,
    progress: bool = True,
    *,
    fused: bool = True,
) -> tuple[LSIProbe, list[EpochRecord]]:
    """Train W_p and psi with BCE, Adam, clipping; keep the epoch with the best validation AUROC.

    ``fused``: Adam's fused kernel (:func:`adam`); ``False`` takes torch's per-tensor loop, the same
    update in another order of rounding (``bench/optimiser.py`` times the two).

    Both sets are read a chunk at a time (``source.chunk_bounds()``), so their size is not bounded
    by memory. Each epoch visits the chunks in a random order and the rows of a chunk in a random
    order; with one chunk this is a plain shuffle of the whole set. Everything random draws from
    ``config.seed``: the same sources and config give the same weights.
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"training needs rows in both sets, got {len(train)} training and {len(val)} validation rows")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    stats = input_stats(train) if config.standardize else None
    model: LSIProbe | None = None  # built at the first chunk, whose width gives the hidden size
    optimiser: torch.optim.Optimizer | None = None
    benign_weight, harmful_weight = class_weights(train.labels, config.class_weight)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    train_labels = torch.from_numpy(np.asarray(train.labels, dtype=np.float32))
    val_labels = np.asarray(val.labels)

    history: list[EpochRecord] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_key: tuple[float, float] = (-np.inf, -np.inf)
    bounds = train.chunk_bounds()
    for epoch in tqdm(range(config.epochs), desc="train probe", disable=not progress):
        total = 0.0
        for chunk_index in torch.randperm(len(bounds), generator=generator).tolist():
            lo, hi = bounds[chunk_index]
            chunk = train.read(lo, hi)
            if model is None or optimiser is None:
                model = LSIProbe(chunk.h_s.shape[1], alpha=config.alpha, init_gain=config.init_gain)
                if stats is not None:
                    model.set_standardization(stats)
                optimiser = adam(model, config, fused)
            model.train()
            h_s, delta_h = torch.from_numpy(chunk.h_s), torch.from_numpy(chunk.delta_h)
            y = train_labels[lo:hi]
            weight = torch.where(y > 0.5, harmful_weight, benign_weight)
            order = torch.randperm(hi - lo, generator=generator)
            for start in range(0, hi - lo, config.batch_size):
                rows = order[start : start + config.batch_size]
                optimiser.zero_grad()
                losses = loss_fn(model(h_s[rows], delta_h[rows]), y[rows])
                loss = (losses * weight[rows]).mean()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimiser.step()
                total += float(losses.detach().sum())
        model.eval()
        val_scores = model.score_source(val)
        val_loss = _bce(val_labels, val_scores)
        history.append(
            EpochRecord(
                epoch=epoch,
                train_loss=total / len(train),
                val_loss=val_loss,
                val_auroc=auroc_or_nan(val_labels, val_scores),
            )
        )
        key = _selection_key(history[-1])
        if key > best_key:
            best_key, best_state = key, copy.deepcopy(model.state_dict())
    assert best_state is not None and model is not None
    model.load_state_dict(best_state)
    model.eval()
    return model, history


def adam(model: nn.Module, config: TrainConfig, fused: bool = True) -> torch.optim.Adam:
    """Adam over ``model``'s parameters at ``config``'s learning rate and weight decay.

    The fused kernel updates each tensor in one pass instead of several. The projector's weight is
    hidden x hidden and a step sees 16 rows, so the update, not the forward, dominated a step:
    fused trains ~1.5-2x faster on CPU (``bench/optimiser.py``), which every sweep pair and
    held-out refit pays.
    """
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def _bce(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (scikit-learn's log loss, clipped like it)."""
    if len(labels) == 0:
        return float("nan")
    return float(log_loss(labels, probabilities, labels=[0, 1]))


def _selection_key(record: EpochRecord) -> tuple[float, float]:
    """Higher validation AUROC wins; ties (and a NaN AUROC) fall back to the lower validation loss."""
    return (0.0 if np.isnan(record.val_auroc) else record.val_auroc, -record.val_loss)


def best_epoch(history: list[EpochRecord]) -> EpochRecord:
    """The epoch :func:`train_probe` kept (the first of equals, as training keeps it)."""
    return max(history, key=_selection_key)


def save_probe(probe: LSIProbe, meta: ProbeMeta, folder: Path) -> None:
    """Write weights as safetensors and everything else as JSON (nothing is pickled)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous() for name, tensor in probe.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    write_meta(meta, folder)


def write_meta(meta: ProbeMeta, folder: Path) -> None:
    """Write ``probe.json``: the metadata, and the hidden-state library versions of this process."""
    record = {**asdict(meta), VERSIONS_KEY: library_versions(HIDDEN_STATE_LIBRARIES)}
    (folder / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))


def read_meta(folder: Path) -> ProbeMeta:
    """The metadata of the detector saved in ``folder``; either file missing is a clear error.

    A probe saved under other torch or transformers versions than this process runs is read with
    a :class:`~pipeline.run_record.LibraryVersionWarning` naming them.
    """
    for path in (folder / WEIGHTS_FILE, folder / META_FILE):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; run the 'train' stage first (dvc repro train)")
    raw = json.loads((folder / META_FILE).read_text())
    warn_if_versions_differ(str(folder / META_FILE), raw.pop(VERSIONS_KEY, None))
    return ProbeMeta(**raw)


def load_probe(folder: Path) -> tuple[LSIProbe, ProbeMeta]:
    """Load a probe written by :func:`save_probe`; a missing or mismatched file is a clear error."""
    weights, meta_path = folder / WEIGHTS_FILE, folder / META_FILE
    meta = read_meta(folder)
    try:
        width = meta.hidden_size * meta.feature_reads()
    except ValueError as exc:
        raise ValueError(f"{meta_path}: {exc}") from None
    probe = LSIProbe(width, alpha=meta.alpha)
    state = load_file(str(weights))
    try:
        probe.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{weights}: weights do not match {meta_path}: {exc}") from None
    probe.eval()
    return probe, meta
