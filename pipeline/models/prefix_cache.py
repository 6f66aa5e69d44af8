"""Cross-request prefix reuse: the keys and values of the prompt start every request shares, computed once.

Every prompt the guard runs starts with the same tokens: the chat template's header and system
prompt, and the user turn's opening, up to the first token of the request's own text (or of its
image). Those tokens' keys and values depend on nothing but the tokens themselves (positions
start at 0, nothing before them to attend to), so, as vLLM's automatic prefix caching does, they
are computed once per process and reused by every later forward whose rows start with them:

- :func:`~pipeline.models.forward.grouped_states` (checks, ``check_many``, the proxy's
  micro-batches, extraction) seeds each batch's cache with the entry, expanded over the batch, and
  runs only the rest of each request's shared prefix behind it;
- :class:`~pipeline.models.session.PrefixSession` (``Guard.generate``) seeds its one-row cache the
  same way, so the answer continues from it too.

**What is cached.** A :class:`CachedPrefix` holds one token sequence's keys and values for every
decoder block. A batch's start is the longest start all its rows' template prefixes share: each
row's template prefix ends before its first request token (the adapters' request mask, so the
entry never holds a request token, whose states it does not keep) and before its first image
token, and never reaches past the row's shared prefix. The entry for exactly that start is used,
built the first time it is needed. So which entry a batch uses depends on the batch alone, never
on what ran before in the process: results are the same in a fresh process and a long-lived one,
bit for bit (a resumed extraction equals an uninterrupted one).

**Invalidation.** An entry's key is its token ids, and the cache belongs to one adapter object
(one model): other prompts, another ``prompts.position`` or another chat template give other
tokens, so another entry; another model is another adapter with its own cache.

Rows of one batch that share more than that start (a long request's views) share it too, within
the batch (:mod:`pipeline.models.batch_starts`; counted in ``shared_in_batch``).

**Memory** is bounded by ``max_tokens`` (least recently used entries go first) and reported by
:meth:`PrefixCache.stats`. :func:`set_prefix_reuse` turns reuse off, or only the in-batch part
(``bench/guard.py`` times each).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch
from transformers import DynamicCache

DEFAULT_MAX_TOKENS = 4096
# A one-token start is most often just a BOS token: not worth an entry.
MIN_PREFIX_TOKENS = 2
# Starts shared within a batch (pipeline.models.batch_starts) add forward calls: the shared starts'
# own, and the rest of the batch split into more length buckets. On the default model on CPU a call
# costs about what 60 tokens do, so sharing pays only when the batch saves a few hundred prefix
# tokens: bench/prefix_reuse.py measured 0.82x for one 200-token request's views (about 70 tokens
# saved) and 1.08x for sixteen of them in a batch.
MIN_BATCH_SAVING = 256


@dataclass(frozen=True)
class CachedPrefix:
    """One token sequence's keys and values for every decoder block, batch 1."""

    tokens: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def width(self) -> int:
        """Columns it takes at the start of every row."""
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def seed(self, cache: DynamicCache, batch: int, depth: int | None = None) -> DynamicCache:
        """``cache`` (empty) filled with this prefix, repeated over ``batch`` rows, for blocks ``0..depth-1``."""
        depth = len(self.layers) if depth is None else depth
        for layer, (keys, values) in zip(cache.layers[:depth], self.layers[:depth], strict=True):
            layer.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
        return cache


@dataclass(frozen=True, kw_only=True)
class PrefixCacheStats:
    """What a prefix cache holds and how it has served: entries, their tokens and bytes, hits and misses."""

    entries: int
    tokens: int
    bytes: int
    max_tokens: int
    hits: int
    misses: int
    builds: int
    evictions: int
    shared_in_batch: int = 0


class PrefixCache:
    """The cached prefixes of one adapter, least recently used evicted beyond ``max_tokens`` tokens in all."""

    def __init__(
        self,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        share_in_batch: bool = True,
        min_batch_saving: int = MIN_BATCH_SAVING,
    ) -> None:
        if max_tokens < MIN_PREFIX_TOKENS:
            raise ValueError(f"max_tokens must be at least {MIN_PREFIX_TOKENS}, got {max_tokens}")
        if min_batch_saving < 0:
            raise ValueError(f"min_batch_saving must be 0 or more, got {min_batch_saving}")
        self.max_tokens = max_tokens
        self.share_in_batch = share_in_batch
        # Fewest prefix tokens a batch's shared starts must save before they run (MIN_BATCH_SAVING).
        self.min_batch_saving = min_batch_saving
        self._entries: OrderedDict[tuple[int, ...], CachedPrefix] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.builds = self.evictions = 0
        # Prefix tokens rows of one batch did not run because a row beside them ran them once
        # (:mod:`pipeline.models.batch_starts`).
        self.shared_in_batch = 0

    def get(self, tokens: Sequence[int]) -> CachedPrefix | None:
        """The entry for exactly these tokens, counted as a hit (and made the most recently used); else None."""
        key = tuple(int(t) for t in tokens)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self.hits += 1
                self._entries.move_to_end(key)
            return entry

    def add(self, entry: CachedPrefix) -> bool:
        """Keep ``entry``, evicting the least recently used beyond the bound; False when it alone is too long."""
        if len(entry.tokens) > self.max_tokens:
            return False
        with self._lock:
            self.builds += 1
            self._entries[entry.tokens] = entry
            self._entries.move_to_end(entry.tokens)
            while sum(len(tokens) for tokens in self._entries) > self.max_tokens:
                self._entries.popitem(last=False)
                self.evictions += 1
        return True

    def missed(self) -> None:
        """Count a batch no entry covered."""
        with self._lock:
            self.misses += 1

    def shared(self, tokens: int) -> None:
        """Count ``tokens`` prefix tokens a batch ran once for several rows."""
        with self._lock:
            self.shared_in_batch += tokens

    def clear(self) -> None:
        """Drop every entry (the counts stay)."""
        with self._lock:
            self._entries.clear()

    def stats(self) -> PrefixCacheStats:
        """What the cache holds now and its counts so far."""
        with self._lock:
            entries = list(self._entries.values())
            return PrefixCacheStats(
                entries=len(entries),
                tokens=sum(len(entry.tokens) for entry in entries),
                bytes=sum(entry.nbytes for entry in entries),
                max_tokens=self.max_tokens,
                hits=self.hits,
                misses=self.misses,
                builds=self.builds,
                evictions=self.evictions,
                shared_in_batch=self.shared_in_batch,
            )


_CACHES: WeakKeyDictionary[Any, PrefixCache | None] = WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def prefix_cache(adapter: Any) -> PrefixCache | None:
    """The adapter's prefix cache, made on first use; None when :func:`set_prefix_reuse` turned reuse off."""
    with _CACHES_LOCK:
        if adapter not in _CACHES:
            _CACHES[adapter] = PrefixCache()
        return _CACHES[adapter]


def set_prefix_reuse(
    adapter: Any,
    enabled: bool = True,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    share_in_batch: bool = True,
    min_batch_saving: int = MIN_BATCH_SAVING,
) -> PrefixCache | None:
    """Turn cross-request prefix reuse on (a fresh, empty cache of ``max_tokens``) or off for ``adapter``.

    ``share_in_batch``: also run once the longer starts rows of one batch share
    (:mod:`pipeline.models.batch_starts`), when that saves at least ``min_batch_saving`` prefix
    tokens in the batch (:data:`MIN_BATCH_SAVING` says why there is a floor); off only to measure
    what it adds.
    """
    cache = PrefixCache(max_tokens, share_in_batch, min_batch_saving) if enabled else None
    with _CACHES_LOCK:
        _CACHES[adapter] = cache
    return cache


def template_length(row: Sequence[int], request_mask: Sequence[int] | None, image_token_ids: frozenset[int]) -> int:
    """How many of ``row``'s first tokens are template: before its first request token and first image token."""
    end = len(row)
    if request_mask is not None and 1 in request_mask:
        end = list(request_mask).index(1)
    for i, token in enumerate(row[:end]):
        if token in image_token_ids:
            return i
    return end


def common_start(rows: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The longest token sequence every row starts with."""
    if not rows:
        return ()
    length = min(len(row) for row in rows)
    for i in range(length):
        token = rows[0][i]
        if any(row[i] != token for row in rows):
            return tuple(rows[0][:i])
    return tuple(rows[0][:length])


def build_prefix(adapter: Any, tokens: Sequence[int], device: torch.device) -> CachedPrefix:
    """Run ``tokens`` through every block of ``adapter``'s model (no image, positions from 0); their cache entry.

    Built under ``no_grad`` rather than ``inference_mode``, so the tensors can serve any later forward.
    """
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    positions = adapter.position_ids(ids, mask, {})
    cache = DynamicCache(config=adapter.model.config)
    with torch.no_grad():
        adapter.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return CachedPrefix(tuple(int(t) for t in tokens), tuple((layer.keys, layer.values) for layer in cache.layers))


def reusable_prefix(
    adapter: Any,
    rows: Sequence[Sequence[int]],
    limit: int,
    template_lengths: Any,
    device: torch.device,
) -> CachedPrefix | None:
    """The cached start a batch of ``rows`` begins with (built now on a miss); None when reuse is off or it is short.

    ``limit``: the most tokens the start may cover (each row's shared prefix). ``template_lengths()``
    gives each row's template length (see :func:`template_length`).
    """
    cache = prefix_cache(adapter)
    if cache is None or limit < MIN_PREFIX_TOKENS:
        return None
    lengths = template_lengths()
    start = common_start([row[: min(length, limit)] for row, length in zip(rows, lengths, strict=True)])
    if len(start) < MIN_PREFIX_TOKENS:
        return None
    entry = cache.get(start)
    if entry is None:
        cache.missed()
        entry = build_prefix(adapter, start, device)
        cache.add(entry)
    return entry
