"""The forwards behind a cached prefix: the prefix itself into a KV cache, then the framings' packed tails.

:func:`~pipeline.models.forward.grouped_states` and :class:`~pipeline.models.session.PrefixSession`
run each request's shared prefix once into a cache (starting from the adapter's cached start,
:mod:`pipeline.models.prefix_cache`, when one fits), then the framings' differing tails together,
packed one after another in one row per request behind that cache: a block-diagonal attention
mask lets each tail see its prefix and its own earlier tokens only, and each tail's positions
start where the prefix ends. A mean read sums the request's tokens of the prefix in the prefix
forward and of each tail in the tails' forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from pipeline.models.forward_protocol import ForwardModel
from pipeline.models.hooks import StopForward, read_layers, weighted_sum_reader


class Start(Protocol):
    """What a prefix forward can start from: columns already computed, seeded into its cache.

    The adapter's cached start (:class:`~pipeline.models.prefix_cache.CachedPrefix`, the same for
    every row) or each row's own (:class:`~pipeline.models.batch_starts.RowStarts`).
    """

    @property
    def width(self) -> int: ...

    def seed(self, cache: Any, batch: int, depth: int | None = None) -> Any: ...


class StopAfterCaching(DynamicCache):
    """A KV cache that ends the forward as soon as block ``stop_layer`` has cached its keys and values."""

    def __init__(self, config: Any, stop_layer: int) -> None:
        super().__init__(config=config)
        self.stop_layer: int | None = stop_layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):  # type: ignore[override]
        keys_values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self.stop_layer:
            raise StopForward
        return keys_values


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, leaving at least one token in every sequence's tail.

    The last token must run in the tail forward: its state is what is read.
    """
    shortest = min(len(sequence) for sequence in sequences)
    length = 0
    while length < shortest - 1 and all(sequence[length] == sequences[0][length] for sequence in sequences):
        length += 1
    return length


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


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to one length, with their attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def tail_positions(prefix_positions: torch.Tensor, segments: torch.Tensor, packed_mask: torch.Tensor) -> torch.Tensor:
    """Positions of packed tails: each tail restarts one past the largest position of its row's prefix.

    For one-axis positions that is the prefix's length; for multi-axis RoPE (Qwen2-VL) text after
    an image also continues from the largest position on any axis, on all axes alike.
    """
    multi_axis = prefix_positions.dim() == 3
    start = prefix_positions.amax(dim=(0, 2)) if multi_axis else prefix_positions.amax(dim=1)
    # Index of each token within its own tail: a running count that restarts at every new segment.
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    new_segment = torch.ones_like(segments, dtype=torch.bool)
    new_segment[:, 1:] = segments[:, 1:] != segments[:, :-1]
    segment_start = torch.where(new_segment, index, torch.zeros_like(index)).cummax(dim=1).values
    tail = start[:, None] + 1 + (index - segment_start) * packed_mask
    if multi_axis:
        tail = tail.unsqueeze(0).expand(prefix_positions.shape[0], -1, -1)
    return tail


# Per group, per member, its 0/1 request mask over its real tokens.
Masks = Sequence[Sequence[Sequence[int]]]


def prefix_weights(
    masks: Masks, prefix_lengths: Sequence[int], width: int, skips: Sequence[int] | None = None
) -> torch.Tensor:
    """``(groups, size, width)``: each member's request mask over its group's left-padded shared prefix.

    With ``skips``, over the prefix after each group's first ``skips[g]`` tokens (those a start
    already holds) instead. Members share the prefix's tokens, not always their meaning: a plain request that starts
    like the framing's text has request tokens where the framed prompts have framing tokens.
    """
    skips = skips if skips is not None else [0] * len(masks)
    weights = torch.zeros(len(masks), len(masks[0]), width)
    for g, (group, n, skip) in enumerate(zip(masks, prefix_lengths, skips, strict=True)):
        for k, member in enumerate(group):
            if n > skip:
                weights[g, k, width - (n - skip) :] = torch.tensor(member[skip:n], dtype=torch.float32)
    return weights


def tail_weights(masks: Masks, prefix_lengths: Sequence[int], width: int) -> torch.Tensor:
    """``(groups, size, width)``: each member's request mask over its own tail's place in the packed row."""
    weights = torch.zeros(len(masks), len(masks[0]), width)
    for g, (group, n) in enumerate(zip(masks, prefix_lengths, strict=True)):
        offset = 0
        for k, member in enumerate(group):
            tail = member[n:]
            weights[g, k, offset : offset + len(tail)] = torch.tensor(tail, dtype=torch.float32)
            offset += len(tail)
    return weights


def prefix_cache_and_sums(
    model: ForwardModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    image_inputs: dict[str, torch.Tensor],
    layers: list[int],
    weights: torch.Tensor,
    entry: Start | None = None,
) -> tuple[DynamicCache, torch.Tensor]:
    """The prefixes' keys and values of blocks ``0..max(layers)``, and ``weights``-summed prefix states.

    Sums ``(groups * size, len(layers), hidden)``; the forward ends after block ``max(layers)``.
    With ``entry`` (the batch's cached start, or each row's own) the cache begins as it, and only the
    columns after it run; ``weights`` then cover those columns only.
    """
    cache = DynamicCache(config=model.model.config)
    start = 0
    if entry is not None:
        start = entry.width
        entry.seed(cache, ids.shape[0], max(layers) + 1)
    if ids.shape[1] == start:  # every row's shared prefix is the cached start itself
        return cache, torch.zeros(weights.shape[0] * weights.shape[1], len(layers), model.info.hidden_size)

    def forward() -> object:
        return model.model(
            input_ids=ids[:, start:],
            attention_mask=mask,
            position_ids=positions[..., start:],
            cache=cache,
            use_cache=True,
            **image_inputs,
        )

    (sums,) = read_layers(forward, model.blocks, layers, [weighted_sum_reader(weights)])
    return cache, sums


def pack_tails(
    sequences: Sequence[Sequence[Sequence[int]]], prefix_lengths: Sequence[int]
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Each group's tails concatenated; their segment index per token (-1 = padding); each tail's last index."""
    packed: list[list[int]] = []
    segment_rows: list[list[int]] = []
    last: list[int] = []
    for group, n in zip(sequences, prefix_lengths, strict=True):
        row: list[int] = []
        segment_row: list[int] = []
        for k, sequence in enumerate(group):
            row.extend(sequence[n:])
            segment_row.extend([k] * (len(sequence) - n))
            last.append(len(row) - 1)
        packed.append(row)
        segment_rows.append(segment_row)
    width = max(len(row) for row in packed)
    segments = torch.full((len(packed), width), -1, dtype=torch.long)
    for i, segment_row in enumerate(segment_rows):
        segments[i, : len(segment_row)] = torch.tensor(segment_row, dtype=torch.long)
    return packed, segments, torch.tensor(last, dtype=torch.long)


def packed_attention_mask(prefix_mask: torch.Tensor, segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask ``(batch, 1, tail, prefix + tail)`` for tails packed after a cached prefix.

    A tail token attends to the real tokens of its row's prefix and to the earlier tokens of its
    own tail. Padding queries see the prefix only: their outputs are never read. Additive (0 or
    the dtype's minimum) rather than boolean, which every attention implementation accepts.
    """
    width = segments.shape[1]
    see_prefix = prefix_mask.bool()[:, None, :].expand(-1, width, -1)
    same_segment = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] >= 0)
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    allowed = torch.cat([see_prefix, same_segment & causal], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def prefix_kv_cache(
    model: ForwardModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    image_inputs: dict[str, torch.Tensor],
    deepest: int,
    entry: Start | None = None,
) -> DynamicCache:
    """The prefixes' keys and values of blocks ``0..deepest``, the forward cut once block ``deepest`` cached them.

    With ``entry`` (the batch's cached start, or each row's own) the cache begins as it, and only the
    columns after it run.
    """
    cache = StopAfterCaching(model.model.config, stop_layer=deepest)
    start = 0
    if entry is not None:
        start = entry.width
        entry.seed(cache, ids.shape[0], deepest + 1)
    if ids.shape[1] == start:  # every row's shared prefix is the cached start itself
        cache.stop_layer = None
        return cache
    try:
        model.model(
            input_ids=ids[:, start:],
            attention_mask=mask,
            position_ids=positions[..., start:],
            cache=cache,
            use_cache=True,
            **image_inputs,
        )
    except StopForward:
        cache.stop_layer = None
        return cache
    raise RuntimeError(f"the prefix forward never reached block {deepest}")


def prefix_layout(prefixes: Sequence[Sequence[int]], start: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' shared prefixes for one forward, with their attention mask.

    Without a cached start (``start`` 0) they are left-padded. With one, every row begins with
    the same ``start`` tokens, then padding, then the rest of its prefix: ``[start | pad | rest]``,
    so the cached keys and values sit in the same columns of every row, and positions (counted
    over the mask) continue from the start in each.
    """
    if start == 0:
        return pad_rows(prefixes, pad_id, left=True)
    rest_ids, rest_mask = pad_rows([row[start:] for row in prefixes], pad_id, left=True)
    head = torch.tensor([list(prefixes[0][:start])] * len(prefixes), dtype=torch.long)
    return torch.cat([head, rest_ids], dim=1), torch.cat([torch.ones_like(head), rest_mask], dim=1)


def first_one(mask: Sequence[int]) -> int:
    """Index of the first 1 in a request mask (its length when there is none)."""
    return list(mask).index(1) if 1 in mask else len(mask)
