"""What the forward procedures (``forward``, ``prefix_forward``, ``session``) need from an adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from pipeline.models.base import ModelInfo, Request


class ForwardModel(Protocol):
    """What the procedures here need from an adapter."""

    info: ModelInfo
    model: nn.Module
    blocks: nn.ModuleList
    pad_token_id: int
    image_token_ids: frozenset[int]

    def encode(self, requests: Sequence[Request], request_masks: bool = False) -> dict[str, torch.Tensor]:
        """A left-padded batch (``input_ids``, ``attention_mask`` and image inputs) on the model's device.

        With ``request_masks`` also ``request_mask``: 1 at each request's own tokens, padded like the ids.
        """
        ...

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Position ids for a left-padded batch: ``(batch, seq)``, or ``(dims, batch, seq)`` for multi-axis RoPE."""
        ...
