"""How a :class:`~pipeline.config.Decoding` setting drives ``transformers``' ``generate``.

The setting itself is configuration (``ecso.decoding``) and lives in :mod:`pipeline.config`; this
module holds what every adapter's ``generate`` does with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pipeline.config import Decoding


def generate_kwargs(decoding: Decoding) -> dict[str, Any]:
    """Keyword arguments for ``generate``, with every unused option left at its off value."""
    kwargs: dict[str, Any] = {"do_sample": decoding.do_sample, "repetition_penalty": decoding.repetition_penalty}
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k or None)
    else:
        # Unset so a model's own generation_config sampling defaults do not warn or leak in.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@contextmanager
def random_state(decoding: Decoding, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for one sampled call and restore them afterwards (no-op when greedy)."""
    if not decoding.do_sample:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(decoding.seed)
        yield
