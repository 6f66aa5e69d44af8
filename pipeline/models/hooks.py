"""Read block outputs with forward hooks, stopping the forward after the deepest one.

Hooks see the raw output of each decoder block (no final norm), which is exactly what the
store's layer convention asks for, and the early stop means layers past ``max(layers)`` are
never computed. What a hook keeps is a reader's choice: the last token's state, or a weighted
sum over positions (the sum behind a mean over the request's tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised from inside a forward (the deepest hook, or a KV cache) to skip the rest of it."""


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for left or right padding alike."""
    # cumsum reaches its maximum first at the last 1 of each row.
    return attention_mask.long().cumsum(dim=-1).argmax(dim=-1)


def find_decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The language model's decoder blocks: the ModuleList of ``num_layers`` blocks outside any vision tower."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == num_layers
        and name.endswith("layers")
        and not any(part in name for part in ("vision", "visual", "image", "encoder."))
    ]
    if len(candidates) != 1:
        names = [name for name, _ in candidates]
        raise RuntimeError(f"could not find the decoder blocks unambiguously (candidates: {names})")
    return candidates[0][1]


# What a hook keeps of one block's output ``(batch, seq, hidden)``: a few rows ``(n, hidden)``.
Reader = Callable[[torch.Tensor], torch.Tensor]


def token_reader(rows: torch.Tensor, positions: torch.Tensor) -> Reader:
    """Keeps the states at ``(rows[i], positions[i])``: ``(len(positions), hidden)``."""

    def read(hidden: torch.Tensor) -> torch.Tensor:
        return hidden[rows.to(hidden.device), positions.to(hidden.device)]

    return read


def weighted_sum_reader(weights: torch.Tensor) -> Reader:
    """Keeps ``weights (batch, reads, seq)`` times the states, summed over positions: ``(batch * reads, hidden)``.

    Summed in float32 whatever the model's dtype: a mean over hundreds of half-precision states
    would otherwise lose digits.
    """

    def read(hidden: torch.Tensor) -> torch.Tensor:
        summed = torch.bmm(weights.to(device=hidden.device, dtype=torch.float32), hidden.float())
        return summed.flatten(0, 1)

    return read


@contextmanager
def _capture(
    blocks: nn.ModuleList,
    layers: Sequence[int],
    readers: Sequence[Reader],
    store: list[dict[int, torch.Tensor]],
    stop: bool,
) -> Iterator[None]:
    """Keep what each reader reads of the requested blocks' outputs; with ``stop``, end after the deepest."""
    deepest = max(layers)
    wanted = set(layers)
    handles = []

    def make_hook(k: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if k in wanted:
                # Only what the readers keep survives the hook, never (batch, seq, hidden).
                for read, kept in zip(readers, store, strict=True):
                    kept[k] = read(hidden)
            if stop and k == deepest:
                raise StopForward

        return hook

    for k in range(deepest + 1):
        handles.append(blocks[k].register_forward_hook(make_hook(k)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def read_layers(
    forward: Callable[[], object],
    blocks: nn.ModuleList,
    layers: Sequence[int],
    readers: Sequence[Reader],
    stop: bool = True,
) -> list[torch.Tensor]:
    """Run ``forward`` and return what each reader kept of blocks ``layers``: ``(n, len(layers), hidden)`` each.

    With ``stop`` the forward ends after block ``max(layers)``; without, it runs to its end (a
    forward whose cache must be complete). Float32 on the CPU; with gradients enabled the results
    stay attached to the graph before being moved.
    """
    captured: list[dict[int, torch.Tensor]] = [{} for _ in readers]
    with _capture(blocks, layers, readers, captured, stop):
        try:
            forward()
        except StopForward:
            pass
    missing = [k for k in layers if k not in captured[0]]
    if missing:
        raise RuntimeError(f"decoder blocks {missing} never ran; is the layer list right for this model?")
    return [torch.stack([kept[k] for k in layers], dim=1).float().cpu() for kept in captured]


def run_to_layers(
    forward: Callable[[], object],
    blocks: nn.ModuleList,
    layers: Sequence[int],
    attention_mask: torch.Tensor | None = None,
    last_positions: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``forward`` until block ``max(layers)`` and return the last token's state at each of ``layers``.

    The last token of each row is ``last_positions`` when given, else found from ``attention_mask``
    (left or right padding). ``rows`` (default: one per position, in order) lets several read
    positions share a batch row, as packed sequences do. Returns a float32 CPU tensor
    ``(len(last_positions), len(layers), hidden)``; with gradients enabled the result stays
    attached to the graph before being moved.
    """
    if last_positions is None:
        if attention_mask is None:
            raise ValueError("run_to_layers needs attention_mask or last_positions")
        last_positions = last_token_positions(attention_mask)
    if rows is None:
        rows = torch.arange(last_positions.shape[0])
    return read_layers(forward, blocks, layers, [token_reader(rows, last_positions)])[0]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a padded row sees the positions an unpadded one would.

    A plain forward (unlike ``generate``) numbers positions from the start of the padded row;
    without this, left padding would shift rotary positions and change every hidden state.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
