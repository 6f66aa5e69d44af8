"""LSI's inputs from stored or freshly computed states.

Everything the probe needs is a function of ``h_b`` and ``h_m`` at the fusion layer and
``h_s`` (the benign prompt) at the safety layer. Each is a framing's pooled *feature*
(:mod:`pipeline.config.pooling`): its last-token state, its mean over the request's own tokens,
or under ``both`` the two concatenated along the feature axis. Stores and adapters hold every read
as its own entry of the framings axis; :func:`pooled_features` (in memory) and
:func:`feature_view` (a store, lazily) turn those into feature states ``(n, framings, layers,
reads * hidden)``, the one layout every detector reads, at extraction and at check time alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import dask.array as da
import numpy as np
import torch

from pipeline.config import VARIANTS, ContrastivePrompts, pooled_variants, pooling_reads
from pipeline.config.pooling import LAST
from pipeline.models.base import ModelAdapter, Request, RequestGroup

if TYPE_CHECKING:  # for annotations only: the guard needs no zarr or dask at run time
    from pipeline.detect.store import ActivationStore


@dataclass(frozen=True)
class LSIFeatures:
    """Per-request probe inputs: ``h_s`` (n, hidden) and ``delta_h = h_m - h_b`` (n, hidden), float32."""

    h_s: np.ndarray
    delta_h: np.ndarray

    def __post_init__(self) -> None:
        # The probe runs in float32 whatever the store or caller held.
        object.__setattr__(self, "h_s", np.ascontiguousarray(self.h_s, dtype=np.float32))
        object.__setattr__(self, "delta_h", np.ascontiguousarray(self.delta_h, dtype=np.float32))
        if self.h_s.shape != self.delta_h.shape or self.h_s.ndim != 2:
            raise ValueError(f"h_s {self.h_s.shape} and delta_h {self.delta_h.shape} must be equal (n, hidden) shapes")

    def __len__(self) -> int:
        return int(self.h_s.shape[0])

    def take(self, rows: np.ndarray) -> LSIFeatures:
        """The features of the given row positions."""
        return LSIFeatures(self.h_s[rows], self.delta_h[rows])


def variant_groups(
    requests: Sequence[Request], prompts: ContrastivePrompts, variants: Sequence[str] = VARIANTS
) -> list[RequestGroup]:
    """One group per request: its text under each of ``variants``, next to its image.

    Each text's span is where the request sits in it, so a mean read averages over the
    request's tokens and not the framing's.
    """
    groups = []
    for request in requests:
        texts = prompts.variants(request.text)
        spans = tuple(prompts.request_span(name, request.text) for name in variants)
        groups.append(RequestGroup(texts=tuple(texts[name] for name in variants), image=request.image, spans=spans))
    return groups


def read_states(
    adapter: ModelAdapter, groups: Sequence[RequestGroup], layers: Sequence[int], reads: Sequence[str] = (LAST,)
) -> torch.Tensor:
    """The adapter's states of ``groups``, ``(n, len(reads) * group_size, layers, hidden)``.

    Last-token reads alone go through the adapter's plain ``group_states(groups, layers)``, so an
    adapter that knows no other read serves them.
    """
    if tuple(reads) == (LAST,):
        return adapter.group_states(groups, layers)
    return adapter.group_states(groups, layers, reads=tuple(reads))


def states_for_requests(
    adapter: ModelAdapter,
    requests: Sequence[Request],
    prompts: ContrastivePrompts,
    layers: Sequence[int],
    pooling: str = LAST,
) -> torch.Tensor:
    """States ``(n, len(pooled_variants(VARIANTS, pooling)), len(layers), hidden)`` for each request and framing.

    The store's layout: under ``last`` the three framings' last-token states, under ``mean``
    their means over the request's own tokens, under ``both`` the former then the latter. The
    framings of one request share their prompt up to the template text; the adapter runs that
    shared part (and the image) once per request.
    """
    return read_states(adapter, variant_groups(requests, prompts), layers, pooling_reads(pooling))


def pooled_features(states: np.ndarray, reads: int) -> np.ndarray:
    """Feature states ``(n, framings, layers, reads * hidden)`` from states ``(n, reads * framings, layers, hidden)``.

    The framings axis holds each read's framings one after the other (:func:`read_states`); a
    framing's feature is its reads concatenated, last token first. One read: ``states`` itself.
    """
    if reads == 1:
        return states
    n, entries, layers, hidden = states.shape
    if entries % reads:
        raise ValueError(f"{entries} framing entries are not {reads} reads of equally many framings")
    split = states.reshape(n, reads, entries // reads, layers, hidden)
    return np.ascontiguousarray(split.transpose(0, 2, 3, 1, 4).reshape(n, entries // reads, layers, reads * hidden))


def feature_view(store: ActivationStore, layers: Sequence[int]) -> da.Array:
    """A store's feature states ``(rows, len(VARIANTS), len(layers), reads * hidden)`` at ``layers``, lazily.

    Under the store's ``pooling``, a framing's feature is its last-token state, its mean, or both
    side by side (:func:`pooled_features`). A store whose framings are not those its pooling
    writes is refused.
    """
    provenance = store.provenance
    expected = pooled_variants(VARIANTS, provenance.pooling)
    if tuple(provenance.variants) != expected:
        from pipeline.detect.store_schema import StoreError  # see _refuse_nan

        raise StoreError(
            f"{store.path}: the store holds framings {list(provenance.variants)}, but pooling"
            f" {provenance.pooling!r} writes {list(expected)}; rerun the 'extract' stage"
        )
    lazy = store.layer_states(layers)
    reads = len(pooling_reads(provenance.pooling))
    if reads == 1:
        return lazy
    size = len(VARIANTS)
    return da.concatenate([lazy[:, r * size : (r + 1) * size] for r in range(reads)], axis=-1)


def features_from_states(
    states: np.ndarray, layers: Sequence[int], fusion_layer: int, safety_layer: int
) -> LSIFeatures:
    """LSI features from states shaped ``(n, framings, layers, hidden)`` whose framings start benign, malicious.

    This is the store layout (``VARIANTS``) and also the live guard's two-framing layout.
    """
    layers = list(layers)
    lf, ls = layers.index(fusion_layer), layers.index(safety_layer)
    benign, malicious = VARIANTS.index("benign"), VARIANTS.index("malicious")
    states = np.asarray(states, dtype=np.float32)
    return LSIFeatures(
        h_s=states[:, benign, ls, :],
        delta_h=states[:, malicious, lf, :] - states[:, benign, lf, :],
    )


def aligned_features(store: ActivationStore, row_ids: np.ndarray, fusion_layer: int, safety_layer: int) -> LSIFeatures:
    """LSI features for ``row_ids`` (in that order) read lazily from a store.

    Only the two layers and two framings the probe uses are read from disk.
    """
    layers = sorted({fusion_layer, safety_layer})
    framed = feature_view(store, layers)[:, : VARIANTS.index("malicious") + 1]
    block = rows_in_order(framed, store_positions(store, row_ids), store.path)
    return features_from_states(block, layers, fusion_layer, safety_layer)


def rows_in_order(lazy: da.Array, positions: np.ndarray, path: Path) -> np.ndarray:
    """Rows ``positions`` of a lazy store array, in that order, as float32; unwritten (NaN) rows are an error.

    Rows are read in store order, a few contiguous shards at a time, then put back in the caller's order.
    A damaged shard is a :class:`~pipeline.detect.store_schema.StoreError` raised by the store's reader.
    """
    ordered = np.sort(positions)
    block = np.asarray(lazy[ordered].compute(), dtype=np.float32)
    _refuse_nan(block, ordered, path)
    return block[np.argsort(np.argsort(positions))]


def _refuse_nan(block: np.ndarray, positions: np.ndarray, path: Path) -> None:
    """Refuse NaN states (rows of an unfinished store), naming the first store rows that hold them."""
    bad = np.flatnonzero(np.isnan(block.reshape(len(block), -1)).any(axis=1))
    if len(bad):
        # Imported here: the guard imports this module and never needs zarr.
        from pipeline.detect.store_schema import StoreError

        rows = [int(positions[i]) for i in bad[:5]]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise StoreError(f"{path}: NaN states (unwritten rows) at store rows {rows}{more}; rerun the 'extract' stage")


class FeatureSource(Protocol):
    """Labelled LSI features read a block of rows at a time, so training never needs them all in memory."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` row ranges, each read in one go."""
        ...

    def read(self, start: int, stop: int) -> LSIFeatures:
        """The features of rows ``start:stop``."""
        ...


def _bounds(n: int, chunk_rows: int) -> list[tuple[int, int]]:
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    return [(lo, min(lo + chunk_rows, n)) for lo in range(0, n, chunk_rows)]


@dataclass
class InMemoryFeatures:
    """A :class:`FeatureSource` over arrays already in memory (tests, the layer sweep, small runs)."""

    features: LSIFeatures
    labels: np.ndarray
    chunk_rows: int = 1 << 30

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels)
        if len(self.labels) != len(self.features):
            raise ValueError(f"{len(self.labels)} labels for {len(self.features)} feature rows")

    def __len__(self) -> int:
        return len(self.features)

    def chunk_bounds(self) -> list[tuple[int, int]]:
        return _bounds(len(self), self.chunk_rows)

    def read(self, start: int, stop: int) -> LSIFeatures:
        return self.features.take(np.arange(start, stop))


class StoreFeatures:
    """A :class:`FeatureSource` reading the two layers and two framings LSI needs from a store, lazily.

    Rows are kept in store order (sorted positions), so each chunk reads a few contiguous shards;
    ``labels`` follow that order. At most ``chunk_rows`` rows are in memory at a time.
    """

    def __init__(
        self,
        *,
        store: ActivationStore,
        row_ids: np.ndarray,
        labels: np.ndarray,
        fusion_layer: int,
        safety_layer: int,
        chunk_rows: int,
    ) -> None:
        positions = store_positions(store, row_ids)
        order = np.argsort(positions, kind="stable")
        self.positions = positions[order]
        self.labels = np.asarray(labels)[order]
        self.row_ids = np.asarray(row_ids)[order]
        self.fusion_layer, self.safety_layer = fusion_layer, safety_layer
        self.layers = sorted({fusion_layer, safety_layer})
        self.framed = feature_view(store, self.layers)[:, : VARIANTS.index("malicious") + 1]
        self.path = store.path
        self.chunk_rows = chunk_rows
        # The last chunk read: a source that fits in one chunk (a validation split, scored every
        # epoch) is read from disk once, and memory still holds at most one chunk.
        self._last: tuple[int, int, LSIFeatures] | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def chunk_bounds(self) -> list[tuple[int, int]]:
        return _bounds(len(self), self.chunk_rows)

    def read(self, start: int, stop: int) -> LSIFeatures:
        if self._last is not None and self._last[:2] == (start, stop):
            return self._last[2]
        positions = self.positions[start:stop]
        block = np.asarray(self.framed[positions].compute(), dtype=np.float32)
        _refuse_nan(block, positions, self.path)
        features = features_from_states(block, self.layers, self.fusion_layer, self.safety_layer)
        self._last = (start, stop, features)
        return features


def store_positions(store: ActivationStore, row_ids: np.ndarray) -> np.ndarray:
    """Positions in the store of ``row_ids`` (in that order); rows missing from the store are an error."""
    position = {int(r): i for i, r in enumerate(store.row_ids)}
    missing = [int(r) for r in row_ids if int(r) not in position]
    if missing:
        from pipeline.detect.store_schema import StoreError  # see _refuse_nan

        raise StoreError(
            f"{store.path}: rows {missing[:5]}{'...' if len(missing) > 5 else ''} of the index are not in the store; "
            "the index changed since extraction: rerun 'extract'"
        )
    return np.array([position[int(r)] for r in row_ids], dtype=np.int64)


def read_all(source: FeatureSource) -> LSIFeatures:
    """Every row of a source in memory (only for sets known to be small, such as a calibration split)."""
    parts = [source.read(lo, hi) for lo, hi in source.chunk_bounds()]
    return LSIFeatures(np.concatenate([p.h_s for p in parts]), np.concatenate([p.delta_h for p in parts]))
