"""How last-token states are computed, for any decoder behind a Hugging Face forward.

Three procedures share one small adapter-facing protocol (:class:`ForwardModel`):

- :func:`single_pass_states`: a left-padded batch, one forward, stopped after the deepest block
  the caller needs.
- :func:`grouped_states`: several prompts per request that differ only at the end (LSI's
  benign / malicious / plain framings of one request with one image). The part their token
  sequences share (system prompt, chat header, image tokens, and any common start of the user
  text) is computed once per request, with the image encoded once; its keys and values are
  copied for each framing, and only the differing tails run again. The shared part also stops
  early: it needs every block below the deepest stored one, but of the deepest block only the
  keys and values, so the forward is cut right after they are cached.
- :func:`reference_states`: the naive procedure everything is checked against: a full forward
  at full depth with ``output_hidden_states=True``, a few prompts at a time.

All three return float32 CPU tensors and never keep more than the last token's hidden state of
the blocks asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from pipeline.models.base import ModelInfo, Request, RequestGroup, check_layers
from pipeline.models.hooks import StopForward, run_to_layers

# Processor outputs that describe tokens; everything else in a batch is an image input.
TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})


class ForwardModel(Protocol):
    """What the procedures here need from an adapter."""

    info: ModelInfo
    model: nn.Module
    blocks: nn.ModuleList
    pad_token_id: int
    image_token_ids: frozenset[int]

    def encode(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """A left-padded batch (``input_ids``, ``attention_mask`` and image inputs) on the model's device."""
        ...

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Position ids for a left-padded batch: ``(batch, seq)``, or ``(dims, batch, seq)`` for multi-axis RoPE."""
        ...


class _StopAfterCaching(DynamicCache):
    """A KV cache that ends the forward as soon as block ``stop_layer`` has cached its keys and values."""

    def __init__(self, config: Any, stop_layer: int) -> None:
        super().__init__(config=config)
        self.stop_layer: int | None = stop_layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):  # type: ignore[override]
        keys_values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self.stop_layer:
            raise StopForward
        return keys_values


def image_inputs_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a processor batch that describe images rather than tokens."""
    return {key: value for key, value in batch.items() if key not in TOKEN_KEYS}


def single_pass_states(model: ForwardModel, requests: Sequence[Request], layers: Sequence[int]) -> torch.Tensor:
    """States ``(n, len(layers), hidden)`` of one left-padded batch, forward stopped after ``max(layers)``."""
    check_layers(layers, model.info.num_layers)
    batch = model.encode(requests)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = model.position_ids(ids, mask, image_inputs_of(batch))

    def forward() -> object:
        return model.model(**batch, position_ids=positions, use_cache=False)

    return run_to_layers(forward, model.blocks, layers, mask)


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, leaving at least one token in every sequence's tail.

    The last token must run in the tail forward: its state is what is read.
    """
    shortest = min(len(sequence) for sequence in sequences)
    length = 0
    while length < shortest - 1 and all(sequence[length] == sequences[0][length] for sequence in sequences):
        length += 1
    return length


def _unpadded(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's real tokens, padding dropped."""
    return [
        row[mask.bool()].tolist()
        for row, mask in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), strict=True)
    ]


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to one length, with their attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _tail_positions(prefix_positions: torch.Tensor, owner: torch.Tensor, tail_mask: torch.Tensor) -> torch.Tensor:
    """Positions of tails: each continues one past the largest position of its prefix (row ``owner``).

    For one-axis positions that is the prefix's length; for multi-axis RoPE (Qwen2-VL) text after
    an image also continues from the largest position on any axis, on all axes alike.
    """
    multi_axis = prefix_positions.dim() == 3
    start = prefix_positions.amax(dim=(0, 2)) if multi_axis else prefix_positions.amax(dim=1)
    offsets = (tail_mask.cumsum(dim=-1) - 1).clamp(min=0)
    tail = start[owner, None] + 1 + offsets
    if multi_axis:
        tail = tail.unsqueeze(0).expand(prefix_positions.shape[0], -1, -1)
    return tail


def _image_tokens(tokens: Sequence[int], image_token_ids: frozenset[int]) -> int:
    return sum(1 for token in tokens if token in image_token_ids)


def grouped_states(
    model: ForwardModel, groups: Sequence[RequestGroup], layers: Sequence[int], split_by_length: bool = True
) -> torch.Tensor:
    """States ``(n_groups, group_size, len(layers), hidden)``, the groups' shared prefixes computed once.

    Groups whose prefixes differ much in length (a request with an image next to one without:
    hundreds of image tokens against a few) run as separate batches, so short prefixes are not
    padded to long ones. Falls back to :func:`single_pass_states` on every prompt when a group's
    prompts do not share all their image tokens (a chat template that puts the image after the text).
    """
    layers = list(layers)
    check_layers(layers, model.info.num_layers)
    size = len(groups[0].texts)
    if any(len(group.texts) != size for group in groups):
        raise ValueError("every group must hold the same number of texts")
    flat = [request for group in groups for request in group.requests()]
    if size == 1:
        return single_pass_states(model, flat, layers).reshape(len(groups), 1, len(layers), -1)

    # One batch per framing: the first also carries the image inputs, used once per group.
    member_batches = [model.encode([group.requests()[k] for group in groups]) for k in range(size)]
    image_inputs = image_inputs_of(member_batches[0])
    members = [_unpadded(batch) for batch in member_batches]
    sequences = [[members[k][g] for k in range(size)] for g in range(len(groups))]
    prefix_lengths = [shared_prefix_length(group) for group in sequences]
    if not all(
        _image_tokens(group[k][length:], model.image_token_ids) == 0
        for group, length in zip(sequences, prefix_lengths, strict=True)
        for k in range(size)
    ):
        states = single_pass_states(model, flat, layers)
        return states.reshape(len(groups), size, len(layers), -1)
    buckets = length_buckets(prefix_lengths)
    if split_by_length and len(buckets) > 1:
        # Re-encoding a bucket's groups costs tokenisation only; the image inputs then hold its images alone.
        out = torch.empty(len(groups), size, len(layers), model.info.hidden_size)
        for bucket in buckets:
            out[bucket] = grouped_states(model, [groups[g] for g in bucket], layers, split_by_length=False)
        return out

    device = member_batches[0]["input_ids"].device
    prefix_ids, prefix_mask = (
        t.to(device)
        for t in _pad([seq[0][:n] for seq, n in zip(sequences, prefix_lengths, strict=True)], model.pad_token_id, True)
    )
    prefix_positions = model.position_ids(prefix_ids, prefix_mask, image_inputs)
    prefix_kv = _prefix_keys_values(model, prefix_ids, prefix_mask, prefix_positions, image_inputs, max(layers))

    tails = [seq[k][n:] for seq, n in zip(sequences, prefix_lengths, strict=True) for k in range(size)]
    states = torch.empty(len(tails), len(layers), model.info.hidden_size)
    for rows in length_buckets([len(tail) for tail in tails]):
        # Prefixes are padded on the left and tails on the right, so every row's real tokens stay
        # contiguous, and padding after a tail's last token is never attended to (attention is causal).
        tail_ids, tail_mask = (t.to(device) for t in _pad([tails[r] for r in rows], model.pad_token_id, left=False))
        owner = torch.tensor([r // size for r in rows], device=device)
        cache = DynamicCache(
            ddp_cache_data=[(keys[owner], values[owner]) for keys, values in prefix_kv], config=model.model.config
        )
        mask = torch.cat([prefix_mask[owner], tail_mask], dim=1)
        positions = _tail_positions(prefix_positions, owner, tail_mask)

        def forward(
            ids: torch.Tensor = tail_ids,
            mask: torch.Tensor = mask,
            positions: torch.Tensor = positions,
            cache: DynamicCache = cache,
        ) -> object:
            return model.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )

        last = tail_mask.sum(dim=1) - 1
        states[rows] = run_to_layers(forward, model.blocks, layers, last_positions=last)
    return states.reshape(len(groups), size, len(layers), -1)


def _prefix_keys_values(
    model: ForwardModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    image_inputs: dict[str, torch.Tensor],
    deepest: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of blocks ``0..deepest`` for the prefixes, the forward cut once block ``deepest`` cached them."""
    cache = _StopAfterCaching(model.model.config, stop_layer=deepest)
    try:
        model.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **image_inputs,
        )
    except StopForward:
        return [(layer.keys, layer.values) for layer in cache.layers[: deepest + 1]]
    raise RuntimeError(f"the prefix forward never reached block {deepest}")


def length_buckets(lengths: Sequence[int], slack: float = 1.25, extra: int = 8) -> list[list[int]]:
    """Indices grouped by similar length, so a padded batch wastes little on padding.

    Sorted by length, a bucket grows while a row is at most ``slack`` times (plus ``extra``
    tokens) as long as the bucket's shortest row.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and lengths[i] <= slack * lengths[buckets[-1][0]] + extra:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def reference_states(
    model: ForwardModel,
    requests: Sequence[Request],
    layers: Sequence[int],
    prompts_per_forward: int = 1,
    with_head: bool = True,
) -> torch.Tensor:
    """The naive procedure: full-depth forwards with ``output_hidden_states=True``, a few prompts at a time.

    Block ``k``'s output is ``hidden_states[k + 1]``. The last block cannot be read this way,
    because transformers 5 applies the final norm to the last entry of ``hidden_states``.
    ``with_head=False`` runs the base model only, skipping the vocabulary projection.
    """
    layers = list(layers)
    check_layers(layers, model.info.num_layers)
    if max(layers) >= model.info.num_layers - 1:
        raise ValueError("the reference reads hidden_states[k + 1], which carries the final norm for the last block")
    rows: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(requests), prompts_per_forward):
            batch = model.encode(requests[start : start + prompts_per_forward])
            ids, mask = batch["input_ids"], batch["attention_mask"]
            positions = model.position_ids(ids, mask, image_inputs_of(batch))
            network = model.model if with_head else model.model.base_model
            output = network(**batch, position_ids=positions, output_hidden_states=True, use_cache=False)
            hidden = output.hidden_states
            # Left padding: every prompt ends in the last column.
            rows.append(torch.stack([hidden[k + 1][:, -1] for k in layers], dim=1).float().cpu())
    return torch.cat(rows)
