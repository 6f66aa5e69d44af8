"""How last-token states are computed, for any decoder behind a Hugging Face forward.

Three procedures share one small adapter-facing protocol (:class:`ForwardModel`):

- :func:`single_pass_states`: a left-padded batch, one forward, stopped after the deepest block
  the caller needs.
- :func:`grouped_states`: several prompts per request that differ only at the end (LSI's
  benign / malicious / plain framings of one request with one image). The part their token
  sequences share (system prompt, chat header, image tokens, and any common start of the user
  text) runs once per request, with the image encoded once, into a KV cache. The differing
  tails then run together, packed one after another in a single row per request behind that
  cache, with a block-diagonal attention mask and positions that restart for each tail, so the
  prefix is never copied per framing. The prefix forward also stops early: it needs every block
  below the deepest stored one, but of the deepest block only the keys and values, so it is cut
  right after they are cached. Requests whose prefixes differ much in length (with and without
  an image) run as separate batches.
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

from pipeline.config.pooling import LAST, MEAN, READS
from pipeline.models.base import ModelInfo, Request, RequestGroup, check_layers
from pipeline.models.hooks import (
    StopForward,
    last_token_positions,
    read_layers,
    run_to_layers,
    token_reader,
    weighted_sum_reader,
)

# Processor outputs that describe tokens; everything else in a batch is an image input.
# ``request_mask`` is ours (the request's own tokens, for mean pooling), never a model input.
TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "request_mask"})


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


def check_reads(reads: Sequence[str]) -> tuple[str, ...]:
    """``reads`` as a tuple, refusing an empty, repeated or unknown read."""
    reads = tuple(reads)
    if not reads or len(set(reads)) != len(reads) or any(read not in READS for read in reads):
        raise ValueError(f"reads must be distinct values from {list(READS)}, got {list(reads)}")
    return reads


def _encode(model: ForwardModel, requests: Sequence[Request], masks: bool) -> tuple[dict[str, torch.Tensor], Any]:
    """``model.encode(requests)`` and, when ``masks``, the batch's request mask taken out of it (else None)."""
    if not masks:
        return model.encode(requests), None
    batch = dict(model.encode(requests, request_masks=True))
    return batch, batch.pop("request_mask")


def _check_counts(counts: Sequence[int], texts: Sequence[str]) -> None:
    """Refuse a prompt with no request token to average, naming its text."""
    empty = [text for count, text in zip(counts, texts, strict=True) if count == 0]
    if empty:
        raise ValueError(
            f"prompt {empty[0]!r} has no tokens of the request's own to average (mean pooling needs a request"
            " text, or for the embedded model text in the image)"
        )


def _by_read(reads: Sequence[str], results: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Readers' results keyed by read; the readers run in :data:`READS` order (last token first)."""
    return dict(zip([read for read in READS if read in reads], results, strict=True))


def _means(sums: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Sums ``(n, layers, hidden)`` over the request tokens divided by their ``counts`` (each checked > 0)."""
    return sums / torch.tensor(counts, dtype=sums.dtype)[:, None, None]


def single_pass_reads(
    model: ForwardModel, requests: Sequence[Request], layers: Sequence[int], reads: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Each read's states ``(n, len(layers), hidden)`` of one left-padded batch, forward stopped after ``max(layers)``.

    ``last``: the last real token; ``mean``: the average over the request's own tokens.
    """
    check_layers(layers, model.info.num_layers)
    reads = check_reads(reads)
    batch, request_mask = _encode(model, requests, MEAN in reads)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if MEAN in reads:
        counts = request_mask.sum(dim=1).tolist()
        _check_counts(counts, [request.text for request in requests])
    positions = model.position_ids(ids, mask, image_inputs_of(batch))
    readers = []
    if LAST in reads:
        readers.append(token_reader(torch.arange(ids.shape[0]), last_token_positions(mask)))
    if MEAN in reads:
        readers.append(weighted_sum_reader(request_mask[:, None, :]))

    def forward() -> object:
        return model.model(**batch, position_ids=positions, use_cache=False)

    found = _by_read(reads, read_layers(forward, model.blocks, layers, readers))
    if MEAN in found:
        found[MEAN] = _means(found[MEAN], counts)
    return found


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


def _tail_positions(prefix_positions: torch.Tensor, segments: torch.Tensor, packed_mask: torch.Tensor) -> torch.Tensor:
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


def _image_tokens(tokens: Sequence[int], image_token_ids: frozenset[int]) -> int:
    return sum(1 for token in tokens if token in image_token_ids)


def grouped_states(
    model: ForwardModel, groups: Sequence[RequestGroup], layers: Sequence[int], reads: Sequence[str] = (LAST,)
) -> torch.Tensor:
    """States ``(n_groups, len(reads) * group_size, len(layers), hidden)``, the groups' shared prefixes computed once.

    Entry ``[g, r * group_size + k]`` is read ``reads[r]`` of text ``k`` of group ``g``: ``last``,
    the last token's state, or ``mean``, the average over the request's own tokens, wherever they
    sit (in the tails, or in the shared prefix: the request itself under ``prompts.position:
    after``, the embedded model's OCR text).

    Groups whose prefixes differ much in length (a request with an image next to one without:
    hundreds of image tokens against a few) run as separate batches, so short prefixes are not
    padded to long ones. Falls back to one forward of every prompt when a group's prompts do not
    share all their image tokens (a chat template that puts the image after the text).
    """
    layers = list(layers)
    check_layers(layers, model.info.num_layers)
    reads = check_reads(reads)
    size = len(groups[0].texts)
    if any(len(group.texts) != size for group in groups):
        raise ValueError("every group must hold the same number of texts")
    if size == 1:
        return _flat_states(model, groups, layers, reads)

    # One batch per framing: the first also carries the image inputs, used once per group.
    encoded = [_encode(model, [group.requests()[k] for group in groups], MEAN in reads) for k in range(size)]
    member_batches = [batch for batch, _ in encoded]
    image_inputs = image_inputs_of(member_batches[0])
    device = member_batches[0]["input_ids"].device
    members = [_unpadded(batch) for batch in member_batches]
    sequences = [[members[k][g] for k in range(size)] for g in range(len(groups))]
    masks = None
    if MEAN in reads:
        member_masks = [_unpadded_masks(batch, mask) for (batch, mask) in encoded]
        masks = [[member_masks[k][g] for k in range(size)] for g in range(len(groups))]
        _check_counts([sum(m) for group in masks for m in group], [t for group in groups for t in group.texts])
    prefix_lengths = [shared_prefix_length(group) for group in sequences]
    if not all(
        _image_tokens(group[k][length:], model.image_token_ids) == 0
        for group, length in zip(sequences, prefix_lengths, strict=True)
        for k in range(size)
    ):
        return _flat_states(model, groups, layers, reads)

    buckets = length_buckets(prefix_lengths)
    if len(buckets) == 1:
        return _shared_prefix_states(model, sequences, prefix_lengths, image_inputs, layers, device, reads, masks)
    out = torch.empty(len(groups), len(reads) * size, len(layers), model.info.hidden_size)
    for bucket in buckets:
        # The token ids are kept; only image inputs are encoded again, to hold this bucket's images alone.
        first_framing = [groups[g].requests()[0] for g in bucket]
        bucket_images = image_inputs_of(model.encode(first_framing)) if image_inputs else {}
        out[bucket] = _shared_prefix_states(
            model,
            [sequences[g] for g in bucket],
            [prefix_lengths[g] for g in bucket],
            bucket_images,
            layers,
            device,
            reads,
            None if masks is None else [masks[g] for g in bucket],
        )
    return out


def _flat_states(
    model: ForwardModel, groups: Sequence[RequestGroup], layers: list[int], reads: tuple[str, ...]
) -> torch.Tensor:
    """Every prompt of every group in one forward, laid out as :func:`grouped_states` returns them."""
    flat = [request for group in groups for request in group.requests()]
    size = len(groups[0].texts)
    if reads == (LAST,):
        return single_pass_states(model, flat, layers).reshape(len(groups), size, len(layers), -1)
    found = single_pass_reads(model, flat, layers, reads)
    stacked = torch.stack([found[read].reshape(len(groups), size, len(layers), -1) for read in reads], dim=1)
    return stacked.reshape(len(groups), len(reads) * size, len(layers), -1)


def _unpadded_masks(batch: dict[str, torch.Tensor], request_mask: torch.Tensor) -> list[list[int]]:
    """Each row's request mask over its real tokens, padding dropped (aligned with :func:`_unpadded`)."""
    return [
        row[mask.bool()].tolist() for row, mask in zip(request_mask.cpu(), batch["attention_mask"].cpu(), strict=True)
    ]


def _shared_prefix_states(
    model: ForwardModel,
    sequences: Sequence[Sequence[Sequence[int]]],
    prefix_lengths: Sequence[int],
    image_inputs: dict[str, torch.Tensor],
    layers: list[int],
    device: torch.device,
    reads: tuple[str, ...] = (LAST,),
    masks: Sequence[Sequence[Sequence[int]]] | None = None,
) -> torch.Tensor:
    """A prefix forward into a cache, then a forward of the packed tails: ``(groups, reads * size, layers, hidden)``.

    A mean read sums the request's tokens of the prefix (in the prefix forward, which then runs
    the deepest block to its end) and of its own tail, and divides by their number.
    """
    size = len(sequences[0])
    prefix_ids, prefix_mask = (
        t.to(device)
        for t in _pad([seq[0][:n] for seq, n in zip(sequences, prefix_lengths, strict=True)], model.pad_token_id, True)
    )
    prefix_positions = model.position_ids(prefix_ids, prefix_mask, image_inputs)
    if MEAN in reads:
        assert masks is not None
        weights = _prefix_weights(masks, prefix_lengths, prefix_ids.shape[1])
        cache, prefix_sums = _prefix_cache_and_sums(
            model, prefix_ids, prefix_mask, prefix_positions, image_inputs, layers, weights
        )
    else:
        cache = _prefix_cache(model, prefix_ids, prefix_mask, prefix_positions, image_inputs, max(layers))

    # The framings' tails are packed into one row per group, after that group's prefix in the
    # cache: no copy of the prefix per framing. A block-diagonal mask lets each tail see its
    # prefix and its own earlier tokens only, and each tail's positions start where the prefix ends.
    packed, segments, last = _pack_tails(sequences, prefix_lengths)
    packed_ids, packed_mask = (t.to(device) for t in _pad(packed, model.pad_token_id, left=False))
    segments = segments.to(device)
    mask = _packed_attention_mask(prefix_mask, segments, model.model.dtype)
    positions = _tail_positions(prefix_positions, segments, packed_mask)
    rows = torch.arange(len(sequences)).repeat_interleave(size)

    def forward() -> object:
        return model.model(
            input_ids=packed_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )

    if reads == (LAST,):
        states = run_to_layers(forward, model.blocks, layers, last_positions=last, rows=rows)
        return states.reshape(len(sequences), size, len(layers), -1)
    assert masks is not None
    readers = [token_reader(rows, last)] if LAST in reads else []
    readers.append(weighted_sum_reader(_tail_weights(masks, prefix_lengths, packed_ids.shape[1])))
    found = _by_read(reads, read_layers(forward, model.blocks, layers, readers))
    found[MEAN] = _means(prefix_sums + found[MEAN], [sum(member) for group in masks for member in group])
    stacked = torch.stack([found[read].reshape(len(sequences), size, len(layers), -1) for read in reads], dim=1)
    return stacked.reshape(len(sequences), len(reads) * size, len(layers), -1)


# Per group, per member, its 0/1 request mask over its real tokens.
Masks = Sequence[Sequence[Sequence[int]]]


def _prefix_weights(masks: Masks, prefix_lengths: Sequence[int], width: int) -> torch.Tensor:
    """``(groups, size, width)``: each member's request mask over its group's left-padded shared prefix.

    Members share the prefix's tokens, not always their meaning: a plain request that starts
    like the framing's text has request tokens where the framed prompts have framing tokens.
    """
    weights = torch.zeros(len(masks), len(masks[0]), width)
    for g, (group, n) in enumerate(zip(masks, prefix_lengths, strict=True)):
        for k, member in enumerate(group):
            if n:
                weights[g, k, width - n :] = torch.tensor(member[:n], dtype=torch.float32)
    return weights


def _tail_weights(masks: Masks, prefix_lengths: Sequence[int], width: int) -> torch.Tensor:
    """``(groups, size, width)``: each member's request mask over its own tail's place in the packed row."""
    weights = torch.zeros(len(masks), len(masks[0]), width)
    for g, (group, n) in enumerate(zip(masks, prefix_lengths, strict=True)):
        offset = 0
        for k, member in enumerate(group):
            tail = member[n:]
            weights[g, k, offset : offset + len(tail)] = torch.tensor(tail, dtype=torch.float32)
            offset += len(tail)
    return weights


def _prefix_cache_and_sums(
    model: ForwardModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    image_inputs: dict[str, torch.Tensor],
    layers: list[int],
    weights: torch.Tensor,
) -> tuple[DynamicCache, torch.Tensor]:
    """The prefixes' keys and values of blocks ``0..max(layers)``, and ``weights``-summed prefix states.

    Sums ``(groups * size, len(layers), hidden)``; the forward ends after block ``max(layers)``.
    """
    cache = DynamicCache(config=model.model.config)

    def forward() -> object:
        return model.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **image_inputs,
        )

    (sums,) = read_layers(forward, model.blocks, layers, [weighted_sum_reader(weights)])
    return cache, sums


def _pack_tails(
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


def _packed_attention_mask(prefix_mask: torch.Tensor, segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


def _prefix_cache(
    model: ForwardModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    image_inputs: dict[str, torch.Tensor],
    deepest: int,
) -> DynamicCache:
    """The prefixes' keys and values of blocks ``0..deepest``, the forward cut once block ``deepest`` cached them."""
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
        cache.stop_layer = None
        return cache
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
