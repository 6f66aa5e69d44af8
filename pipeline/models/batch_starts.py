"""Starts that rows of one batch share beyond the template, computed once per batch.

The cross-request cache (:mod:`pipeline.models.prefix_cache`) holds the template's start, which
every request shares. Some rows of a batch share much more: under ``guard.views: ends`` a long
request is scored as a whole and as its first words, and both prompts run the chat header and the
same first words of the request (under ``prompts.position: after`` the request itself is in the
shared prefix); attacker wrappers that open with the same paragraph share it too. Here the rows
whose prefixes begin with the same :data:`MIN_SHARED_TOKENS` or more tokens after the batch's
cached start form a cluster. Each cluster's common start (its *trunk*) runs once, behind the cached
start, and every row of the cluster continues from it (:class:`RowStarts`): the same keys and
values a row's own forward would compute (causal attention: a token's keys and values depend only
on the tokens before it), computed once instead of once per row.

Trunks add forward calls, so a batch shares them only when they save at least the cache's
``min_batch_saving`` prefix tokens (:data:`pipeline.models.prefix_cache.MIN_BATCH_SAVING` gives the
measurements behind the default).

Which rows share a trunk depends on the batch alone, as the cached start does, so results do not
depend on what ran before. Batches with image inputs never cluster: their image tokens would sit in
a trunk and make the image inputs per row differ from the rows' own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.models.forward_protocol import ForwardModel
from pipeline.models.prefix_cache import CachedPrefix, prefix_cache
from pipeline.models.prefix_forward import (
    Masks,
    pad_rows,
    prefix_cache_and_sums,
    prefix_kv_cache,
    prefix_layout,
)

# Shorter common starts are not worth a forward of their own.
MIN_SHARED_TOKENS = 16


@dataclass(frozen=True)
class Cluster:
    """Rows (indices into the batch) whose prefixes share their first ``length`` tokens."""

    rows: tuple[int, ...]
    length: int


def shared_clusters(prefixes: Sequence[Sequence[int]], skip: int, min_tokens: int = MIN_SHARED_TOKENS) -> list[Cluster]:
    """Clusters of two or more rows sharing at least ``min_tokens`` tokens after their first ``skip`` (which all share).

    The rows sorted by their tokens put those with a common start next to each other; a cluster is a
    run of neighbours each sharing ``min_tokens`` or more with the next, and its length is what all
    its rows share (from token 0). Every row is in at most one cluster; clusters come in the order
    of their first rows.
    """
    order = sorted(range(len(prefixes)), key=lambda i: tuple(prefixes[i][skip:]))
    clusters: list[Cluster] = []
    run: list[int] = []
    shared = 0
    for previous, current in zip(order, order[1:], strict=False):
        common = _common_length(prefixes[previous], prefixes[current], skip)
        if common - skip >= min_tokens:
            shared = common if not run else min(shared, common)
            run = run or [previous]
            run.append(current)
            continue
        if run:
            clusters.append(Cluster(tuple(sorted(run)), shared))
        run = []
    if run:
        clusters.append(Cluster(tuple(sorted(run)), shared))
    return sorted(clusters, key=lambda cluster: cluster.rows)


def _common_length(a: Sequence[int], b: Sequence[int], skip: int) -> int:
    length = min(len(a), len(b))
    for i in range(skip, length):
        if a[i] != b[i]:
            return i
    return length


@dataclass(frozen=True, kw_only=True)
class RowStarts:
    """Each row's own start for a prefix forward: its columns' ids and mask, and their keys and values per block.

    ``ids``/``mask`` ``(rows, width)``: a row's start is its first ``lengths[i]`` real tokens, then
    padding. ``layers``: per block, keys and values ``(rows, heads, width, head_dim)``. ``sums``
    (mean reads only) ``(rows * size, len(layers read), hidden)``: each member's sum of its request
    tokens' states inside the start.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    sums: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """Columns the start takes in every row."""
        return int(self.ids.shape[1])

    @property
    def lengths(self) -> list[int]:
        """Real tokens of each row's start."""
        return [int(n) for n in self.mask.sum(dim=1)]

    def seed(self, cache: object, batch: int, depth: int | None = None) -> object:
        """``cache`` (empty) filled with each row's start, for blocks ``0..depth-1``."""
        if batch != self.ids.shape[0]:
            raise ValueError(f"these starts are for {self.ids.shape[0]} rows, not {batch}")
        depth = len(self.layers) if depth is None else depth
        for layer, (keys, values) in zip(cache.layers[:depth], self.layers[:depth], strict=True):  # type: ignore[attr-defined]
            layer.update(keys, values)
        return cache

    def select(self, rows: Sequence[int]) -> RowStarts:
        """The starts of ``rows`` only, in that order (``sums`` kept per member)."""
        index = torch.tensor(list(rows), dtype=torch.long)
        sums = None
        if self.sums is not None:
            size = self.sums.shape[0] // self.ids.shape[0]
            member_rows = (index[:, None] * size + torch.arange(size)).flatten()
            sums = self.sums[member_rows.to(self.sums.device)]
        return RowStarts(
            ids=self.ids[index],
            mask=self.mask[index],
            layers=tuple((k[index.to(k.device)], v[index.to(v.device)]) for k, v in self.layers),
            sums=sums,
        )

    @staticmethod
    def of_entry(entry: CachedPrefix, rows: int, depth: int) -> RowStarts:
        """The cached start ``entry`` as every row's start (views, no copies), blocks ``0..depth-1``."""
        ids = torch.tensor([list(entry.tokens)], dtype=torch.long).expand(rows, -1)
        layers = tuple((k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in entry.layers[:depth])
        return RowStarts(ids=ids, mask=torch.ones_like(ids), layers=layers)


def shared_starts(
    model: ForwardModel,
    prefixes: Sequence[Sequence[int]],
    entry: CachedPrefix | None,
    layers: list[int],
    device: torch.device,
    masks: Masks | None = None,
    min_tokens: int = MIN_SHARED_TOKENS,
) -> RowStarts | None:
    """Every row's start: its cluster's trunk (run once per cluster) or else the cached ``entry``; None if no cluster.

    ``prefixes``: each row's shared prefix (text only). ``masks`` (mean reads): each row's members'
    request masks, whose tokens inside a trunk are summed here, per member, at ``layers``.
    """
    skip = 0 if entry is None else len(entry.tokens)
    clusters = shared_clusters(prefixes, skip, min_tokens)
    if not clusters:
        return None
    cache_of_adapter = prefix_cache(model)
    if cache_of_adapter is not None:
        cache_of_adapter.shared(sum((len(c.rows) - 1) * (c.length - skip) for c in clusters))
    deepest = max(layers)
    trunks = [list(prefixes[cluster.rows[0]][: cluster.length]) for cluster in clusters]
    ids, mask = (t.to(device) for t in prefix_layout(trunks, skip, model.pad_token_id))
    positions = model.position_ids(ids, mask, {})
    sums = None
    if masks is None:
        cache = prefix_kv_cache(model, ids, mask, positions, {}, deepest, entry)
    else:
        weights, slots = _trunk_weights(clusters, masks, skip, ids.shape[1] - skip)
        cache, trunk_sums = prefix_cache_and_sums(model, ids, mask, positions, {}, layers, weights, entry)
        size = len(masks[0])
        sums = torch.zeros(len(prefixes) * size, *trunk_sums.shape[1:])
        for member, slot in slots.items():
            sums[member] = trunk_sums[slot]
    trunk_layers = [(layer.keys, layer.values) for layer in cache.layers[: deepest + 1]]  # type: ignore[attr-defined]

    # Rows outside every cluster start with the cached entry alone, padded to the trunks' width.
    width = ids.shape[1]
    lone_ids, lone_mask = pad_rows([list(entry.tokens) if entry is not None else []], model.pad_token_id, left=False)
    lone_ids = torch.cat([lone_ids, torch.full((1, width - lone_ids.shape[1]), model.pad_token_id)], dim=1)
    lone_mask = torch.cat([lone_mask, torch.zeros((1, width - lone_mask.shape[1]), dtype=torch.long)], dim=1)
    row_of = {row: c for c, cluster in enumerate(clusters) for row in cluster.rows}
    index = torch.tensor([row_of.get(row, len(clusters)) for row in range(len(prefixes))], dtype=torch.long)
    all_layers = []
    for block, (keys, values) in enumerate(trunk_layers):
        lone_keys = torch.zeros_like(keys[:1])
        lone_values = torch.zeros_like(values[:1])
        if entry is not None:
            lone_keys[:, :, :skip] = entry.layers[block][0]
            lone_values[:, :, :skip] = entry.layers[block][1]
        all_layers.append(
            (
                torch.cat([keys, lone_keys])[index.to(keys.device)],
                torch.cat([values, lone_values])[index.to(values.device)],
            )
        )
    return RowStarts(
        ids=torch.cat([ids.cpu(), lone_ids])[index],
        mask=torch.cat([mask.cpu(), lone_mask])[index],
        layers=tuple(all_layers),
        sums=sums,
    )


def _trunk_weights(
    clusters: Sequence[Cluster], masks: Masks, skip: int, width: int
) -> tuple[torch.Tensor, dict[int, int]]:
    """Each cluster member's request mask over its trunk's tokens after the cached start, right-aligned in ``width``.

    Returns the weights ``(clusters, most members, width)`` and, per member (``row * size + k``), its
    row in the summed output (``cluster * most members + slot``). The cached start holds no request
    token (it ends before the first), so its columns need no weights.
    """
    size = len(masks[0])
    most = max(len(cluster.rows) for cluster in clusters) * size
    weights = torch.zeros(len(clusters), most, width)
    slots: dict[int, int] = {}
    for c, cluster in enumerate(clusters):
        for j, row in enumerate(cluster.rows):
            for k, member in enumerate(masks[row]):
                part = member[skip : cluster.length]
                weights[c, j * size + k, width - len(part) :] = torch.tensor(part, dtype=torch.float32)
                slots[row * size + k] = c * most + j * size + k
    return weights, slots
