"""The detector a run ships, saved as safetensors plus JSON (nothing is pickled), and loaded back.

``data/probe/probe.safetensors`` holds the weights: the LSI probe's state dict, or a linear
probe's ``weight`` and ``bias``. ``data/probe/probe.json`` holds :class:`ProbeMeta`, whose
``detector`` field says which of the two it is and ``pooling`` which features it reads. Files
written before those fields existed are LSI, and read last-token states.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.detect.detector import LSI, Detector, LinearDetector, LSIDetector
from pipeline.detect.pieces import Piece
from pipeline.detect.probe import META_FILE, WEIGHTS_FILE, ProbeMeta, load_probe, read_meta, save_probe, write_meta


def save_detector(detector: Detector, meta: ProbeMeta, folder: Path) -> None:
    """Write a detector and its metadata under ``folder``; ``meta.detector`` must name it."""
    if meta.detector != detector.name:
        raise ValueError(f"metadata names detector {meta.detector!r} but the detector is {detector.name!r}")
    if meta.pooling != detector.pooling:
        raise ValueError(f"metadata names pooling {meta.pooling!r} but the detector reads {detector.pooling!r}")
    if isinstance(detector, LSIDetector):
        save_probe(detector.probe_, meta, folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    weight = torch.from_numpy(np.ascontiguousarray(detector.coef_[0], dtype=np.float32))
    bias = torch.tensor([float(detector.intercept_[0])], dtype=torch.float32)
    save_file({"weight": weight, "bias": bias}, str(folder / WEIGHTS_FILE))
    write_meta(meta, folder)


def load_detector(folder: Path) -> tuple[Detector, ProbeMeta]:
    """The detector :func:`save_detector` wrote, with its metadata; missing or mismatched files are clear errors."""
    weights, meta_path = folder / WEIGHTS_FILE, folder / META_FILE
    meta = read_meta(folder)
    if meta.detector == LSI:
        probe, meta = load_probe(folder)
        return LSIDetector.from_probe(probe, meta.fusion_layer, meta.safety_layer, meta.pooling), meta
    state = load_file(str(weights))
    if set(state) != {"weight", "bias"}:
        raise ValueError(
            f"{weights}: expected tensors 'weight' and 'bias' for detector {meta.detector!r}, got {sorted(state)}"
        )
    try:
        pieces = [Piece.parse(text) for text in meta.pieces]
        weight, bias = state["weight"].numpy(), float(state["bias"][0])
        detector = LinearDetector.from_weights(meta.detector, pieces, weight, bias, meta.pooling)
    except ValueError as exc:
        raise ValueError(f"{meta_path}: {exc}") from None
    reads = meta.feature_reads()
    if detector.n_features_in_ != meta.hidden_size * reads * len(pieces):
        pooled = "" if reads == 1 else f" under {meta.pooling} pooling ({reads} reads each)"
        raise ValueError(
            f"{weights}: {detector.n_features_in_} weights, but {len(pieces)} piece(s) of hidden size "
            f"{meta.hidden_size}{pooled} in {meta_path}"
        )
    return detector, meta
