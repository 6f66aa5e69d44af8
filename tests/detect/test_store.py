"""Activation stores: layout, provenance checks, refusal to overwrite, lazy reads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

import pipeline.io
from pipeline.detect.store import ActivationStore, delete_store
from pipeline.detect.store_schema import Provenance, StoreError


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


def test_written_shards_and_missing_blocks(tmp_path: Path) -> None:
    store = ActivationStore.create(tmp_path / "s.zarr", list(range(10)), provenance(), shard_rows=4)
    assert store.shard_blocks() == [(0, 4), (4, 8), (8, 10)]
    assert store.written_shards() == [] and store.missing_row_blocks() == store.shard_blocks()
    store.write_block(8, np.ones((2, 3, 2, 8)))
    store.write_block(0, np.ones((4, 3, 2, 8)))
    reopened = ActivationStore.open(tmp_path / "s.zarr", require_complete=False)
    assert reopened.written_shards() == [0, 2] and reopened.missing_row_blocks() == [(4, 8)]
    assert np.isnan(reopened.states().compute()[4:8]).all()  # unwritten rows never look like data


def test_mark_complete_needs_every_shard(tmp_path: Path) -> None:
    store = ActivationStore.create(tmp_path / "s.zarr", list(range(6)), provenance(), shard_rows=4)
    store.write_block(0, np.ones((4, 3, 2, 8)))
    with pytest.raises(StoreError, match=r"rows \[\(4, 6\)\] are not written"):
        store.mark_complete()
    store.write_block(4, np.ones((2, 3, 2, 8)))
    store.mark_complete()
    assert ActivationStore.open(tmp_path / "s.zarr").is_complete


def test_block_must_end_on_a_shard_boundary(tmp_path: Path) -> None:
    store = ActivationStore.create(tmp_path / "s.zarr", list(range(8)), provenance(), shard_rows=4)
    with pytest.raises(StoreError, match="block end 2 is not aligned"):
        store.write_block(0, np.zeros((2, 3, 2, 8), dtype=np.float32))
    store.write_block(0, np.zeros((8, 3, 2, 8), dtype=np.float32))  # two whole shards at once
    assert store.written_shards() == [0, 1]


def test_create_builds_beside_and_renames(tmp_path: Path) -> None:
    abandoned = tmp_path / f".s.zarr.{'0' * 32}.building"  # what a run killed while creating leaves
    (abandoned / "states").mkdir(parents=True)
    unrelated = tmp_path / ".other.building"
    unrelated.mkdir()
    ActivationStore.create(tmp_path / "s.zarr", [1, 2], provenance(), inputs_digest="d1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.building", "s.zarr"]
    store = ActivationStore.open(tmp_path / "s.zarr", require_complete=False)
    assert store.inputs_digest == "d1" and not store.is_complete


def test_open_for_writing_sweeps_temp_files(tmp_path: Path) -> None:
    write_store(tmp_path / "s.zarr")
    leftovers = [
        tmp_path / "s.zarr" / f".zarr.json.{'a' * 32}.tmp",
        tmp_path / "s.zarr" / "states" / "c" / "1" / "0" / "0" / f".0.{'b' * 32}.tmp",
    ]
    for leftover in leftovers:
        leftover.write_bytes(b"half a fi")
    ActivationStore.open(tmp_path / "s.zarr")  # readers ignore them
    assert all(p.exists() for p in leftovers)
    ActivationStore.open_for_writing(tmp_path / "s.zarr")
    assert not any(p.exists() for p in leftovers)
    assert not [p for p in (tmp_path / "s.zarr").rglob("*") if p.name.endswith(".tmp")]


def test_failed_shard_write_keeps_the_old_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    states = write_store(tmp_path / "s.zarr")
    store = ActivationStore.open_for_writing(tmp_path / "s.zarr")

    def broken_disk(file: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.io._sync_file", broken_disk)
    with pytest.raises(OSError, match="disk full"):
        store.write_block(4, np.zeros((4, 3, 2, 8)))
    monkeypatch.undo()
    np.testing.assert_allclose(ActivationStore.open(tmp_path / "s.zarr").states().compute(), states, atol=1e-3)
    assert not [p for p in (tmp_path / "s.zarr").rglob("*") if p.name.endswith(".tmp")]


def test_setup_differences_name_rows_shards_and_inputs(tmp_path: Path) -> None:
    store = ActivationStore.create(tmp_path / "s.zarr", [5, 6, 7], provenance(), shard_rows=2, inputs_digest="d1")
    assert store.setup_differences(provenance(), [5, 6, 7], 2, "d1") == []
    assert store.setup_differences(provenance(), [5, 6, 7], 2) == []  # no digest to compare
    assert store.setup_differences(provenance(), [5, 6], 2, "d1") == ["row_id: store has 3 rows, expected 2"]
    assert store.setup_differences(provenance(), [5, 9, 7], 2, "d1") == [
        "row_id: 1 of 3 rows differ, first at position 1 (store has 6, expected 9)"
    ]
    assert store.setup_differences(provenance(), [5, 6, 7], 3, "d1") == ["shard_rows: store has 2, expected 3"]
    assert store.setup_differences(provenance(), [5, 6, 7], 2, "d2") == [
        "inputs: the texts or images of the requests changed since the store was created"
    ]
    assert store.setup_differences(provenance(model_revision="new"), [5, 6, 7], 2, "d1") == [
        "model_revision: store has 'abc', expected 'new'"
    ]


def test_delete_store_leaves_nothing(tmp_path: Path) -> None:
    write_store(tmp_path / "s.zarr")
    delete_store(tmp_path / "s.zarr")
    assert list(tmp_path.iterdir()) == []


def test_every_store_file_is_written_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    original = pipeline.io._sync_file

    def recording(file: BinaryIO) -> None:
        synced.append(Path(file.name).name.rsplit(".", 2)[0][1:])  # ".NAME.<hex>.tmp" -> NAME
        original(file)

    monkeypatch.setattr("pipeline.io._sync_file", recording)
    write_store(tmp_path / "s.zarr", n=6, shard_rows=4)
    written = [p.name for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()]
    assert sorted(set(synced)) == sorted(set(written)) == ["0", "zarr.json"]
    assert synced.count("0") == 3  # the row ids, then two shards
    assert synced.count("zarr.json") >= 5  # group, two arrays, the attributes, the complete flag
