"""A tiny model that takes its time over every batch, for tests that must act while a shard is computing.

Loaded by Dask workers (the loader is pickled by reference), so it lives in an importable module.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.models.base import RequestGroup
from pipeline.models.hf_vlm import HFVisionLanguageAdapter


class SlowAdapter:
    """``adapter`` unchanged, except that :meth:`group_states` first sleeps ``delay_s`` seconds."""

    def __init__(self, adapter: HFVisionLanguageAdapter, delay_s: float) -> None:
        self.adapter = adapter
        self.delay_s = delay_s
        self.info = adapter.info

    def group_states(self, groups: Sequence[RequestGroup], layers: Sequence[int]) -> torch.Tensor:
        """The adapter's states, ``delay_s`` late."""
        time.sleep(self.delay_s)
        return self.adapter.group_states(groups, layers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.adapter, name)


def load_tiny(folder: Path, delay_s: float = 0.0) -> HFVisionLanguageAdapter | SlowAdapter:
    """The tiny model in ``folder`` on the CPU, slowed by ``delay_s`` per batch when it is positive."""
    adapter = HFVisionLanguageAdapter.from_folder(folder, device="cpu")
    return SlowAdapter(adapter, delay_s) if delay_s > 0 else adapter
