"""Activation stores: layout, provenance checks, refusal to overwrite, lazy reads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import ActivationStore, Provenance, StoreError


def provenance(**changes: object) -> Provenance:
    base = Provenance(
        model_name="tiny",
        model_revision="abc",
        model_dtype="float32",
        template_benign="B: {q}",
        template_malicious="M: {q}",
        variants=("benign", "malicious", "plain"),
        layers=(1, 3),
        hidden_size=8,
    )
    return replace(base, **changes)


def write_store(path: Path, n: int = 10, shard_rows: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    states = rng.normal(size=(n, 3, 2, 8)).astype(np.float32)
    store = ActivationStore.create(path, list(range(100, 100 + n)), provenance(), shard_rows=shard_rows)
    for start in range(0, n, shard_rows):
        store.write_block(start, states[start : start + shard_rows])
    store.mark_complete()
    return states


def test_roundtrip_float16_and_row_ids(tmp_path: Path) -> None:
    states = write_store(tmp_path / "s.zarr")
    store = ActivationStore.open(tmp_path / "s.zarr", expected=provenance())
    assert store.num_rows == 10
    assert store.row_ids.tolist() == list(range(100, 110))
    read = store.states().compute()
    assert read.dtype == np.float16
    np.testing.assert_allclose(read, states, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(store.layer_states([3]).compute()[:, :, 0], states[:, :, 1], atol=1e-3)


def test_sharded_into_few_files(tmp_path: Path) -> None:
    write_store(tmp_path / "s.zarr", n=40, shard_rows=16)
    shard_files = [p for p in (tmp_path / "s.zarr" / "states").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(shard_files) == 3  # 40 rows in shards of 16, however many chunks each holds


def test_provenance_mismatch_names_the_field(tmp_path: Path) -> None:
    write_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"template_malicious: store has 'M: \{q\}', expected 'X: \{q\}'"):
        ActivationStore.open(tmp_path / "s.zarr", expected=provenance(template_malicious="X: {q}"))
    with pytest.raises(StoreError, match="layers"):
        ActivationStore.open(tmp_path / "s.zarr", expected=provenance(layers=(1, 2)))


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    states = write_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="already exists"):
        ActivationStore.create(tmp_path / "s.zarr", [1, 2], provenance())
    np.testing.assert_allclose(ActivationStore.open(tmp_path / "s.zarr").states().compute(), states, atol=1e-3)


def test_unfinished_store_is_refused(tmp_path: Path) -> None:
    ActivationStore.create(tmp_path / "s.zarr", [1, 2, 3], provenance(), shard_rows=2)
    with pytest.raises(StoreError, match="did not finish"):
        ActivationStore.open(tmp_path / "s.zarr")


def test_unaligned_block_is_refused(tmp_path: Path) -> None:
    store = ActivationStore.create(tmp_path / "s.zarr", list(range(8)), provenance(), shard_rows=4)
    with pytest.raises(StoreError, match="not aligned"):
        store.write_block(2, np.zeros((2, 3, 2, 8), dtype=np.float32))


def test_missing_layer_is_named(tmp_path: Path) -> None:
    write_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"layers \[2\] are not in the store"):
        ActivationStore.open(tmp_path / "s.zarr").layer_states([2])


def test_missing_store_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="run the 'extract' stage"):
        ActivationStore.open(tmp_path / "nothing.zarr")
