"""What a linear detector reads: pieces of stored states, and how they are fetched.

A piece is one framing's pooled state at one layer (``plain@9``), or the malicious-minus-benign
difference at one (``delta@12``). Detectors, the guard and the explanations all fetch states
through a :data:`StateGetter`, so one recipe serves stored arrays and live forward passes alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import VARIANTS

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
