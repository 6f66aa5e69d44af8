"""The LSI projector and safety probe, their training, and safe persistence.

``s = sigmoid(psi(h_s + alpha * W_p(delta_h)))``. Only ``W_p`` and ``psi`` train; the model is
frozen and never seen here: training runs from stored features.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from pipeline.config import TrainConfig
from pipeline.features import LSIFeatures

WEIGHTS_FILE = "probe.safetensors"
META_FILE = "probe.json"


class LSIProbe(nn.Module):
    """Latent safety injection: a hidden->hidden projector ``W_p`` and a hidden->1 probe ``psi``."""

    def __init__(self, hidden_size: int, alpha: float = 0.1, init_gain: float = 0.02) -> None:
        super().__init__()
        self.alpha = alpha
        self.projector = nn.Linear(hidden_size, hidden_size)
        self.probe = nn.Linear(hidden_size, 1)
        # A small projector starts the injection near zero, so the probe first reads h_s alone.
        nn.init.xavier_normal_(self.projector.weight, gain=init_gain)
        nn.init.zeros_(self.projector.bias)

    def forward(self, h_s: torch.Tensor, delta_h: torch.Tensor) -> torch.Tensor:
        """Refusal logits, shape ``(n,)``."""
        injected = h_s + self.alpha * self.projector(delta_h)
        return self.probe(injected).squeeze(-1)

    @torch.inference_mode()
    def score(self, features: LSIFeatures) -> np.ndarray:
        """Refusal probabilities for a block of features."""
        self.eval()
        logits = self(torch.from_numpy(features.h_s), torch.from_numpy(features.delta_h))
        return torch.sigmoid(logits).numpy()


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of training, for ``dvc plots``."""

    epoch: int
    train_loss: float
    val_loss: float
    val_auroc: float


@dataclass(frozen=True)
class ProbeMeta:
    """What a saved probe needs to be used correctly: its shape and which layers feed it."""

    hidden_size: int
    alpha: float
    fusion_layer: int
    safety_layer: int
    best_epoch: int
    best_val_auroc: float
    store_provenance: dict[str, Any]


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    # AUROC is undefined on a one-class split; NaN keeps that visible instead of crashing.
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def train_probe(
    train: LSIFeatures,
    train_labels: np.ndarray,
    val: LSIFeatures,
    val_labels: np.ndarray,
    config: TrainConfig,
    progress: bool = True,
) -> tuple[LSIProbe, list[EpochRecord]]:
    """Train W_p and psi with BCE, Adam, clipping; keep the epoch with the best validation AUROC."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    hidden = train.h_s.shape[1]
    model = LSIProbe(hidden, alpha=config.alpha, init_gain=config.init_gain)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    h_s, delta_h = torch.from_numpy(train.h_s), torch.from_numpy(train.delta_h)
    y = torch.from_numpy(train_labels.astype(np.float32))
    val_h_s, val_delta = torch.from_numpy(val.h_s), torch.from_numpy(val.delta_h)
    val_y = torch.from_numpy(val_labels.astype(np.float32))

    history: list[EpochRecord] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_key: tuple[float, float] = (-np.inf, -np.inf)
    for epoch in tqdm(range(config.epochs), desc="train probe", disable=not progress):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), config.batch_size):
            rows = order[start : start + config.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(h_s[rows], delta_h[rows]), y[rows])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimiser.step()
            total += loss.detach().item() * len(rows)
        model.eval()
        with torch.no_grad():
            val_logits = model(val_h_s, val_delta)
            val_loss = float(loss_fn(val_logits, val_y))
        val_auroc = _auroc(val_labels, torch.sigmoid(val_logits).numpy())
        history.append(EpochRecord(epoch, total / len(y), val_loss, val_auroc))
        key = _selection_key(history[-1])
        if key > best_key:
            best_key, best_state = key, copy.deepcopy(model.state_dict())
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return model, history


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
    (folder / META_FILE).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True))


def load_probe(folder: Path) -> tuple[LSIProbe, ProbeMeta]:
    """Load a probe written by :func:`save_probe`; a missing or mismatched file is a clear error."""
    weights, meta_path = folder / WEIGHTS_FILE, folder / META_FILE
    for path in (weights, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; run the 'train' stage first (dvc repro train)")
    meta = ProbeMeta(**json.loads(meta_path.read_text()))
    probe = LSIProbe(meta.hidden_size, alpha=meta.alpha)
    state = load_file(str(weights))
    try:
        probe.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{weights}: weights do not match {meta_path}: {exc}") from None
    probe.eval()
    return probe, meta
