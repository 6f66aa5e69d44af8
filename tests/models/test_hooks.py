"""Last-token indexing, padding-proof positions, and early exit through forward hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models.hooks import find_decoder_layers, last_token_positions, position_ids_from_mask, run_to_layers


def test_last_token_for_left_and_right_padding() -> None:
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert last_token_positions(left).tolist() == [3, 3]
    assert last_token_positions(right).tolist() == [1, 2]


def test_positions_ignore_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


class Counter(nn.Module):
    """A block that adds its index and counts its calls, so early exit is observable."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.calls = k, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.k


class Stack(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Counter(k) for k in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def test_run_to_layers_stops_after_the_deepest_block() -> None:
    model = Stack(6)
    x = torch.zeros(2, 3, 4)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    states = run_to_layers(lambda: model(x), model.layers, [3, 1], mask)
    assert states.shape == (2, 2, 4)
    # block k's output is 0 + 1 + ... + k; layer order follows the request
    assert states[0, 0, 0].item() == 6 and states[0, 1, 0].item() == 1
    assert [b.calls for b in model.layers] == [1, 1, 1, 1, 0, 0]
    assert not any(b._forward_hooks for b in model.layers)  # hooks are removed afterwards


def test_decoder_layers_must_be_unambiguous() -> None:
    assert find_decoder_layers(Stack(4), 4) is not None
    both = nn.Module()
    both.a, both.b = Stack(4), Stack(4)
    with pytest.raises(RuntimeError, match="unambiguously"):
        find_decoder_layers(both, 4)
