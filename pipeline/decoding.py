"""Decoding settings shared by every adapter's ``generate``: greedy by default, or seeded sampling.

Kept free of torch at import time so configuration can be validated without loading the model stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Decoding:
    """How new tokens are chosen: greedy by default, or sampled with a fixed seed.

    ``temperature``, ``top_p`` and ``top_k`` (0: off) apply only when ``do_sample`` is true;
    ``repetition_penalty`` (1.0: off) applies either way. Sampling draws under ``seed`` inside a
    forked random state, so the same requests and settings give the same text and nothing else's
    randomness is disturbed.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0: off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        """True when decoding is plain greedy: the same tokens as any other greedy loop."""
        return not self.do_sample and self.repetition_penalty == 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers``' ``generate``, with every unused option left at its off value."""
        kwargs: dict[str, Any] = {"do_sample": self.do_sample, "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            # Unset so a model's own generation_config sampling defaults do not warn or leak in.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    @contextmanager
    def random_state(self, device: torch.device) -> Iterator[None]:
        """Seed torch's generators for one sampled call and restore them afterwards (no-op when greedy)."""
        if not self.do_sample:
            yield
            return
        import torch

        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            yield


GREEDY = Decoding()
