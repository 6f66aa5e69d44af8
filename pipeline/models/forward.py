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
- :func:`~pipeline.models.reference.reference_states`: the naive procedure everything is checked
  against: a full forward at full depth with ``output_hidden_states=True``, a few prompts at a time.

The prefix forward behind a cache and the packed tails are in :mod:`pipeline.models.prefix_forward`;
the start every request shares comes from :mod:`pipeline.models.prefix_cache`.

All three return float32 CPU tensors and never keep more than the last token's hidden state of
the blocks asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.config.pooling import LAST, MEAN, READS
from pipeline.models.base import Request, RequestGroup, check_layers
from pipeline.models.batch_starts import RowStarts, shared_clusters, shared_starts
from pipeline.models.forward_protocol import ForwardModel
from pipeline.models.hooks import (
    last_token_positions,
    read_layers,
    run_to_layers,
    token_reader,
    weighted_sum_reader,
)
from pipeline.models.prefix_cache import CachedPrefix, common_start, prefix_cache, reusable_prefix, template_length
from pipeline.models.prefix_forward import (
    Masks,
    first_one,
    length_buckets,
    pack_tails,
    packed_attention_mask,
    pad_rows,
    prefix_cache_and_sums,
    prefix_kv_cache,
    prefix_weights,
    shared_prefix_length,
    tail_positions,
    tail_weights,
)

# Processor outputs that describe tokens; everything else in a batch is an image input.
# ``request_mask`` is ours (the request's own tokens, for mean pooling), never a model input.
TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "request_mask"})


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


def _unpadded(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's real tokens, padding dropped."""
    return [
        row[mask.bool()].tolist()
        for row, mask in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), strict=True)
    ]


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
    # One text a group takes one plain forward when reuse is off (as before reuse) or when the batch
    # sends pixels (a forward behind a cached start takes none): decided before encoding, so the
    # images are not processed twice.
    pixels = bool(model.image_token_ids) and any(group.image is not None for group in groups)
    if size == 1 and (prefix_cache(model) is None or pixels):
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
    if size == 1:
        return _one_text_states(model, groups, sequences, masks, image_inputs, layers, device, reads)
    prefix_lengths = [shared_prefix_length(group) for group in sequences]
    if not all(
        _image_tokens(group[k][length:], model.image_token_ids) == 0
        for group, length in zip(sequences, prefix_lengths, strict=True)
        for k in range(size)
    ):
        return _flat_states(model, groups, layers, reads)

    starts = None
    if not image_inputs:
        starts = _shared_starts(model, groups, sequences, prefix_lengths, layers, device, masks)
    # Rows that continue from a shared start are as long as what they still run.
    buckets = length_buckets(
        prefix_lengths if starts is None else [n - s for n, s in zip(prefix_lengths, starts.lengths, strict=True)]
    )
    if len(buckets) == 1:
        return _shared_prefix_states(
            model,
            sequences,
            prefix_lengths,
            image_inputs,
            layers,
            device,
            reads,
            masks,
            lambda: group_masks(model, groups),
            starts,
        )
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
            lambda bucket=bucket: group_masks(model, [groups[g] for g in bucket]),
            None if starts is None else starts.select(bucket),
        )
    return out


def _one_text_states(
    model: ForwardModel,
    groups: Sequence[RequestGroup],
    sequences: Sequence[Sequence[Sequence[int]]],
    masks: Masks | None,
    image_inputs: dict[str, torch.Tensor],
    layers: list[int],
    device: torch.device,
    reads: tuple[str, ...],
) -> torch.Tensor:
    """Groups of one text (a detector that reads one framing, such as the plain prompt), with reuse on.

    Each row runs in one forward from the longest start it can reuse: one that rows of the batch
    share (a long request's views), else the adapter's cached start; with neither, or with image
    inputs (which a forward behind a start does not take), the plain forward.
    """
    if image_inputs:  # grouped_states sends pixel batches to the plain forward before encoding them
        return _flat_states(model, groups, layers, reads)
    # Starts end before each row's last token, whose state is read.
    before_last = [len(group[0]) - 1 for group in sequences]
    starts = _shared_starts(model, groups, sequences, before_last, layers, device, masks)
    if starts is None:
        entry = _batch_prefix(model, sequences, before_last, masks, device, lambda: group_masks(model, groups))
        if entry is None:
            return _flat_states(model, groups, layers, reads)
        starts = RowStarts.of_entry(entry, len(groups), max(layers) + 1)
    # The shared prefix is the start itself: nothing runs before the one forward of every row's rest.
    return _shared_prefix_states(model, sequences, starts.lengths, {}, layers, device, reads, masks, None, starts)


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
    request_masks: Callable[[], Masks] | None = None,
    starts: RowStarts | None = None,
) -> torch.Tensor:
    """A prefix forward into a cache, then a forward of the packed tails: ``(groups, reads * size, layers, hidden)``.

    The prefix forward starts from ``starts`` (each row's start, :mod:`pipeline.models.batch_starts`)
    when given, else from the adapter's cached start when one fits
    (:mod:`pipeline.models.prefix_cache`; ``request_masks`` encodes the request masks that choosing
    it needs, when the batch has none of its own).

    A mean read sums the request's tokens of the prefix (in the prefix forward, which then runs
    the deepest block to its end, plus what the starts summed) and of its own tail, and divides
    by their number.
    """
    size = len(sequences[0])
    prefixes = [seq[0][:n] for seq, n in zip(sequences, prefix_lengths, strict=True)]
    if starts is None and (masks is not None or request_masks is not None):
        entry = _batch_prefix(model, sequences, prefix_lengths, masks, device, request_masks or (lambda: []))
        if entry is not None:
            starts = RowStarts.of_entry(entry, len(sequences), max(layers) + 1)
    skips = [0] * len(sequences) if starts is None else starts.lengths
    # Each row: its start's columns, then the rest of its prefix, left-padded.
    rest_ids, rest_mask = pad_rows([p[s:] for p, s in zip(prefixes, skips, strict=True)], model.pad_token_id, left=True)
    if starts is not None:
        rest_ids, rest_mask = torch.cat([starts.ids, rest_ids], dim=1), torch.cat([starts.mask, rest_mask], dim=1)
    prefix_ids, prefix_mask = rest_ids.to(device), rest_mask.to(device)
    prefix_positions = model.position_ids(prefix_ids, prefix_mask, image_inputs)
    width = 0 if starts is None else starts.width
    if MEAN in reads:
        assert masks is not None
        weights = prefix_weights(masks, prefix_lengths, prefix_ids.shape[1] - width, skips)
        cache, prefix_sums = prefix_cache_and_sums(
            model, prefix_ids, prefix_mask, prefix_positions, image_inputs, layers, weights, starts
        )
        if starts is not None and starts.sums is not None:
            prefix_sums = prefix_sums + starts.sums.to(prefix_sums.device)
    else:
        cache = prefix_kv_cache(model, prefix_ids, prefix_mask, prefix_positions, image_inputs, max(layers), starts)

    # The framings' tails are packed into one row per group, after that group's prefix in the
    # cache: no copy of the prefix per framing. A block-diagonal mask lets each tail see its
    # prefix and its own earlier tokens only, and each tail's positions start where the prefix ends.
    packed, segments, last = pack_tails(sequences, prefix_lengths)
    packed_ids, packed_mask = (t.to(device) for t in pad_rows(packed, model.pad_token_id, left=False))
    segments = segments.to(device)
    mask = packed_attention_mask(prefix_mask, segments, model.model.dtype)
    positions = tail_positions(prefix_positions, segments, packed_mask)
    rows = torch.arange(len(sequences)).repeat_interleave(size)

    def forward() -> object:
        return model.model(
            input_ids=packed_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )

    if reads == (LAST,):
        states = run_to_layers(forward, model.blocks, layers, last_positions=last, rows=rows)
        return states.reshape(len(sequences), size, len(layers), -1)
    assert masks is not None
    readers = [token_reader(rows, last)] if LAST in reads else []
    readers.append(weighted_sum_reader(tail_weights(masks, prefix_lengths, packed_ids.shape[1])))
    found = _by_read(reads, read_layers(forward, model.blocks, layers, readers))
    found[MEAN] = _means(prefix_sums + found[MEAN], [sum(member) for group in masks for member in group])
    stacked = torch.stack([found[read].reshape(len(sequences), size, len(layers), -1) for read in reads], dim=1)
    return stacked.reshape(len(sequences), len(reads) * size, len(layers), -1)


def _batch_prefix(
    model: ForwardModel,
    sequences: Sequence[Sequence[Sequence[int]]],
    prefix_lengths: Sequence[int],
    masks: Masks | None,
    device: torch.device,
    request_masks: Callable[[], Masks],
) -> CachedPrefix | None:
    """The cached start every group of the batch can reuse (:mod:`pipeline.models.prefix_cache`), or None.

    It covers at most each group's shared prefix and ends before any member's first request token
    and first image token. Template lengths come from the request masks (``masks``, or for
    last-token reads ``request_masks()``, which encodes them).
    """
    limit = min(prefix_lengths)
    if masks is not None:
        limit = min([limit, *(first_one(member) for group in masks for member in group)])

    def template_lengths() -> list[int]:
        found = masks if masks is not None else request_masks()
        return [
            min(
                template_length(member, mask, model.image_token_ids)
                for member, mask in zip(group, group_mask, strict=True)
            )
            for group, group_mask in zip(sequences, found, strict=True)
        ]

    return reusable_prefix(model, [group[0] for group in sequences], limit, template_lengths, device)


def _shared_starts(
    model: ForwardModel,
    groups: Sequence[RequestGroup],
    sequences: Sequence[Sequence[Sequence[int]]],
    prefix_lengths: Sequence[int],
    layers: list[int],
    device: torch.device,
    masks: Masks | None,
) -> RowStarts | None:
    """Each group's start when some groups share a long start beyond the batch's common one, else None.

    Only with cross-request reuse on (off is the path before any reuse), and only when the clusters
    save at least the cache's ``min_batch_saving`` prefix tokens. The clusters are found first, so a
    batch without any pays for nothing more (:mod:`pipeline.models.batch_starts`).
    """
    cache = prefix_cache(model)
    if cache is None or not cache.share_in_batch or len(sequences) < 2:
        return None
    prefixes = [group[0][:n] for group, n in zip(sequences, prefix_lengths, strict=True)]
    skip = len(common_start(prefixes))
    clusters = shared_clusters(prefixes, skip)
    # Each cluster's rows but one skip its trunk; too small a saving costs more calls than it saves.
    if not clusters or sum((len(c.rows) - 1) * (c.length - skip) for c in clusters) < cache.min_batch_saving:
        return None
    entry = _batch_prefix(model, sequences, prefix_lengths, masks, device, lambda: group_masks(model, groups))
    return shared_starts(model, prefixes, entry, layers, device, masks)


def group_masks(model: ForwardModel, groups: Sequence[RequestGroup]) -> list[list[list[int]]]:
    """Each group's members' request masks over their real tokens (one encoding per framing)."""
    size = len(groups[0].texts)
    encoded = [_encode(model, [group.requests()[k] for group in groups], True) for k in range(size)]
    members = [_unpadded_masks(batch, mask) for batch, mask in encoded]
    return [[members[k][g] for k in range(size)] for g in range(len(groups))]
