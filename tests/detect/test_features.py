"""LSI features from a store: lazy, chunked reads that match the in-memory path."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.detect.features import StoreFeatures, aligned_features, read_all
from pipeline.detect.probe import best_epoch, train_probe
from pipeline.detect.store import ActivationStore
from tests.detect.test_store import provenance

HIDDEN = 8
PROVENANCE = provenance(hidden_size=HIDDEN)


def separable_store(path: Path, n: int, shard_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A store whose harmful rows move the malicious framing at layer 3 along one axis."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=n)
    states = rng.normal(size=(n, 3, 2, HIDDEN)).astype(np.float32)
    states[:, 1, 1, 0] += 4.0 * labels
    row_ids = np.arange(1000, 1000 + n)
    store = ActivationStore.create(path, row_ids.tolist(), PROVENANCE, shard_rows=shard_rows)
    for start in range(0, n, shard_rows):
        store.write_block(start, states[start : start + shard_rows])
    store.mark_complete()
    return row_ids, labels


def test_chunked_store_reads_equal_the_whole_read_in_store_order(tmp_path: Path) -> None:
    row_ids, labels = separable_store(tmp_path / "s.zarr", 40, shard_rows=8)
    store = ActivationStore.open(tmp_path / "s.zarr")
    wanted = np.random.default_rng(1).permutation(row_ids)[:25]
    wanted_labels = labels[wanted - 1000]
    source = StoreFeatures(
        store=store, row_ids=wanted, labels=wanted_labels, fusion_layer=3, safety_layer=1, chunk_rows=3
    )
    assert all(hi - lo <= 3 for lo, hi in source.chunk_bounds())
    # Rows come in store order, labels follow them.
    np.testing.assert_array_equal(source.row_ids, np.sort(wanted))
    np.testing.assert_array_equal(source.labels, labels[np.sort(wanted) - 1000])
    whole = aligned_features(store, np.sort(wanted), fusion_layer=3, safety_layer=1)
    chunked = read_all(source)
    np.testing.assert_array_equal(chunked.h_s, whole.h_s)
    np.testing.assert_array_equal(chunked.delta_h, whole.delta_h)


def test_training_from_a_store_in_tiny_chunks_never_materialises_it(tmp_path: Path) -> None:
    row_ids, labels = separable_store(tmp_path / "s.zarr", 160, shard_rows=16)
    store = ActivationStore.open(tmp_path / "s.zarr")
    train = StoreFeatures(
        store=store, row_ids=row_ids[:120], labels=labels[:120], fusion_layer=3, safety_layer=1, chunk_rows=4
    )
    val = StoreFeatures(
        store=store, row_ids=row_ids[120:], labels=labels[120:], fusion_layer=3, safety_layer=1, chunk_rows=4
    )
    computed: list[tuple[int, ...]] = []

    class Spy(dask.callbacks.Callback):
        def _finish(self, dsk, state, errored):  # noqa: ANN001, ANN202 - dask's callback signature
            computed.extend(np.shape(v) for v in state["cache"].values() if hasattr(v, "shape"))

    with Spy():
        _, history = train_probe(train, val, TrainConfig(lr=1e-2, epochs=6, alpha=1.0), progress=False)
    assert best_epoch(history).val_auroc > 0.9
    # Every dask computation saw at most one 16-row shard (a chunk of 4 rows reads inside one shard).
    assert computed and max(shape[0] for shape in computed if shape) <= 16


def test_missing_rows_are_named(tmp_path: Path) -> None:
    separable_store(tmp_path / "s.zarr", 8, shard_rows=8)
    store = ActivationStore.open(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match=r"rows \[5\].*rerun 'extract'"):
        StoreFeatures(
            store=store,
            row_ids=np.array([1000, 5]),
            labels=np.array([0, 1]),
            fusion_layer=3,
            safety_layer=1,
            chunk_rows=2,
        )


def test_a_one_chunk_source_is_read_from_disk_once(tmp_path: Path) -> None:
    row_ids, labels = separable_store(tmp_path / "s.zarr", 24, shard_rows=8)
    source = StoreFeatures(
        store=ActivationStore.open(tmp_path / "s.zarr"),
        row_ids=row_ids,
        labels=labels,
        fusion_layer=3,
        safety_layer=1,
        chunk_rows=100,
    )
    computed = []

    class Spy(dask.callbacks.Callback):
        def _start(self, dsk):  # noqa: ANN001, ANN202 - dask's callback signature
            computed.append(1)

    with Spy():
        first = source.read(0, 24)
        again = source.read(0, 24)
    assert len(computed) == 1 and again is first
