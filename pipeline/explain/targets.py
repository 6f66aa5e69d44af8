"""What an attribution integrates: a scalar function of a request's pooled states.

- ``detector``: the shipped detector's own logit (:meth:`Detector.logits`), the score the guard
  decides on; it reads the framings and layers the detector reads.
- ``contrast``: the method's contrast signal ``||h_m - h_b||`` at the fusion layer, whatever
  detector ships.

Both take the same :data:`~pipeline.detect.pieces.StateGetter` the detectors take, so the
integrated-gradients machinery runs either one unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import ATTRIBUTE_TARGETS, VARIANTS
from pipeline.config.pooling import LAST, POOLINGS
from pipeline.detect.detector import Detector
from pipeline.detect.pieces import StateGetter

DETECTOR, CONTRAST = ATTRIBUTE_TARGETS


@dataclass(frozen=True, kw_only=True)
class Target:
    """One attributable score: ``score(get)`` gives ``(n,)`` values, differentiable in the states ``get`` returns.

    ``variants`` are the framings it reads (store order), ``layers`` the blocks (ascending),
    ``pooling`` how a framing's states become its feature (``extract.pooling``: the last token's,
    the mean over the request's tokens, or both side by side); ``label`` says in words what is
    attributed, ``detector`` describes the guard's detector (empty when none is known).
    """

    kind: str
    label: str
    detector: str
    layers: tuple[int, ...]
    variants: tuple[str, ...]
    score: Callable[[StateGetter], torch.Tensor]
    pooling: str = LAST

    def __post_init__(self) -> None:
        if self.kind not in ATTRIBUTE_TARGETS:
            raise ValueError(f"unknown attribution target {self.kind!r}; expected one of {list(ATTRIBUTE_TARGETS)}")
        if not self.layers or not self.variants:
            raise ValueError("an attribution target reads at least one layer of one framing")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {list(POOLINGS)}")
        if [v for v in VARIANTS if v in self.variants] != list(self.variants):
            raise ValueError(f"target framings must be a subset of {VARIANTS} in that order, got {self.variants}")

    def record_fields(self) -> dict[str, Any]:
        """What an :class:`~pipeline.explain.record.Attribution` records of its target."""
        return {"target": self.kind, "target_label": self.label, "detector": self.detector, "layers": list(self.layers)}


def contrast_target(fusion_layer: int, detector: str = "") -> Target:
    """``||h_m - h_b||`` at ``fusion_layer``: the contrast between the malicious and the benign framing."""

    def score(get: StateGetter) -> torch.Tensor:
        return get("delta", fusion_layer).norm(dim=-1)

    label = f"||h_m - h_b|| at layer {fusion_layer}"
    return Target(
        kind=CONTRAST,
        label=label,
        detector=detector,
        layers=(fusion_layer,),
        variants=("benign", "malicious"),
        score=score,
    )


def detector_target(detector: Detector) -> Target:
    """The detector's logit (``sigmoid`` of it is the guard's refusal score), over what the detector reads:
    its framings and layers, pooled as its store was (``detector.pooling``)."""
    description = detector.describe()
    return Target(
        kind=DETECTOR,
        label=f"the logit of {description}",
        detector=description,
        layers=tuple(sorted(detector.layers)),
        variants=tuple(detector.variants),
        score=detector.logits,
        pooling=detector.pooling,
    )


def attribution_target(kind: str, detector: Detector, fusion_layer: int) -> Target:
    """The target ``kind`` names for a guard's ``detector``; ``contrast`` reads ``fusion_layer``."""
    if kind == DETECTOR:
        return detector_target(detector)
    if kind == CONTRAST:
        return contrast_target(fusion_layer, detector.describe())
    raise ValueError(f"unknown attribution target {kind!r}; expected one of {list(ATTRIBUTE_TARGETS)}")
