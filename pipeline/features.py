"""LSI's inputs from stored or freshly computed last-token states.

Everything the probe needs is a function of ``h_b`` and ``h_m`` at the fusion layer and
``h_s`` (the benign prompt) at the safety layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.models.base import ModelAdapter, Request, RequestGroup
from pipeline.prompts import VARIANTS, ContrastivePrompts

if TYPE_CHECKING:
    from pipeline.store import ActivationStore


@dataclass(frozen=True)
class LSIFeatures:
    """Per-request probe inputs: ``h_s`` (n, hidden) and ``delta_h = h_m - h_b`` (n, hidden), float32."""

    h_s: np.ndarray
    delta_h: np.ndarray

    def __post_init__(self) -> None:
        # The probe runs in float32 whatever the store or caller held.
        object.__setattr__(self, "h_s", np.ascontiguousarray(self.h_s, dtype=np.float32))
        object.__setattr__(self, "delta_h", np.ascontiguousarray(self.delta_h, dtype=np.float32))
        if self.h_s.shape != self.delta_h.shape or self.h_s.ndim != 2:
            raise ValueError(f"h_s {self.h_s.shape} and delta_h {self.delta_h.shape} must be equal (n, hidden) shapes")

    def __len__(self) -> int:
        return int(self.h_s.shape[0])

    def take(self, rows: np.ndarray) -> LSIFeatures:
        """The features of the given row positions."""
        return LSIFeatures(self.h_s[rows], self.delta_h[rows])


def variant_groups(
    requests: Sequence[Request], prompts: ContrastivePrompts, variants: Sequence[str] = VARIANTS
) -> list[RequestGroup]:
    """One group per request: its text under each of ``variants``, next to its image."""
    groups = []
    for request in requests:
        texts = prompts.variants(request.text)
        groups.append(RequestGroup(texts=tuple(texts[name] for name in variants), image=request.image))
    return groups


def states_for_requests(
    adapter: ModelAdapter, requests: Sequence[Request], prompts: ContrastivePrompts, layers: Sequence[int]
) -> torch.Tensor:
    """Last-token states ``(n, len(VARIANTS), len(layers), hidden)`` for each request and framing.

    The framings of one request share their prompt up to the template text; the adapter runs
    that shared part (and the image) once per request.
    """
    return adapter.group_states(variant_groups(requests, prompts), layers)


def features_from_states(
    states: np.ndarray, layers: Sequence[int], fusion_layer: int, safety_layer: int
) -> LSIFeatures:
    """LSI features from states shaped ``(n, framings, layers, hidden)`` whose framings start benign, malicious.

    This is the store layout (``VARIANTS``) and also the live guard's two-framing layout.
    """
    layers = list(layers)
    lf, ls = layers.index(fusion_layer), layers.index(safety_layer)
    benign, malicious = VARIANTS.index("benign"), VARIANTS.index("malicious")
    states = np.asarray(states, dtype=np.float32)
    return LSIFeatures(
        h_s=states[:, benign, ls, :],
        delta_h=states[:, malicious, lf, :] - states[:, benign, lf, :],
    )


def lsi_features(
    adapter: ModelAdapter,
    requests: Sequence[Request],
    prompts: ContrastivePrompts,
    fusion_layer: int,
    safety_layer: int,
) -> LSIFeatures:
    """Compute LSI features live (for the guard), stopping the forward at the deeper of the two layers.

    The plain variant is not needed here, so only the two framed prompts are run.
    """
    layers = sorted({fusion_layer, safety_layer})
    groups = variant_groups(requests, prompts, variants=("benign", "malicious"))
    states = adapter.group_states(groups, layers).numpy()
    return features_from_states(states, layers, fusion_layer, safety_layer)


def aligned_features(store: ActivationStore, row_ids: np.ndarray, fusion_layer: int, safety_layer: int) -> LSIFeatures:
    """LSI features for ``row_ids`` (in that order) read lazily from a store.

    Only the two layers and two framings the probe uses are read from disk.
    """
    stored_ids = store.row_ids
    position = {int(r): i for i, r in enumerate(stored_ids)}
    missing = [int(r) for r in row_ids if int(r) not in position]
    if missing:
        raise ValueError(
            f"{store.path}: rows {missing[:5]}{'...' if len(missing) > 5 else ''} of the index are not in the store; "
            "the index changed since extraction: rerun 'extract'"
        )
    layers = sorted({fusion_layer, safety_layer})
    framed = store.layer_states(layers)[:, : VARIANTS.index("malicious") + 1]
    rows = np.array([position[int(r)] for r in row_ids], dtype=np.int64)
    block = np.asarray(framed[np.sort(rows)].compute(), dtype=np.float32)
    # Undo the sort so features follow the caller's row order.
    block = block[np.argsort(np.argsort(rows))]
    if np.isnan(block).any():
        raise ValueError(f"{store.path}: NaN states (unwritten rows) among the requested rows")
    return features_from_states(block, layers, fusion_layer, safety_layer)
