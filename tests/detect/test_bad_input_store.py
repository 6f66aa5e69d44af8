"""The store surface of the bad-input matrix: a damaged or mismatched store fed to a stage that reads it.

Each case damages a copy of a sound store, runs the ``sweep`` stage on it (through the stage
runner, as ``dvc repro`` does) and checks that the stage stops with one ``error:`` line naming the
shard file, row range, attribute or provenance field, and that every file there before (the store,
the index, the model folder and the stage's earlier outputs) is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import stages.sweep as sweep_stage
from pipeline.config import ClusterConfig, Params
from pipeline.data.index import INDEX_COLUMNS
from pipeline.detect.provenance import expected_provenance
from stages import run_stage
from tests.detect.test_store_integrity import (
    FIRST_ROW_ID,
    INDEX_BYTES,
    ROWS,
    chunk_spans,
    fake_embedded_folder,
    flip_bit,
    store_params,
    write_sound_store,
)


def _flip_in_chunk(store: Path) -> None:
    shard = store / "states/c/1/0/0/0"
    offset, length = chunk_spans(shard)[1]
    flip_bit(shard, offset + length // 2)


def _flip_in_index(store: Path) -> None:
    shard = store / "states/c/1/0/0/0"
    flip_bit(shard, shard.stat().st_size - INDEX_BYTES + 3)


def _random_bytes(store: Path) -> None:
    shard = store / "states/c/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[200:264] = np.random.default_rng(2).bytes(64)
    shard.write_bytes(bytes(data))


def _truncate(store: Path) -> None:
    shard = store / "states/c/1/0/0/0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _empty(store: Path) -> None:
    (store / "states/c/2/0/0/0").write_bytes(b"")


def _edit_attributes(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(store: Path) -> None:
        metadata = store / "zarr.json"
        raw = json.loads(metadata.read_text())
        change(raw["attributes"])
        metadata.write_text(json.dumps(raw))

    return edit


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda attributes: attributes.__setitem__(key, value)


def _set_provenance(key: str, value: object) -> Callable[[dict], None]:
    return lambda attributes: attributes["provenance"].__setitem__(key, value)


def _drop_provenance(key: str) -> Callable[[dict], None]:
    return lambda attributes: attributes["provenance"].pop(key)


@dataclass(frozen=True)
class Case:
    """One way a store goes bad, and what the stage's error must name."""

    name: str
    damage: Callable[[Path], None]
    names: tuple[str, ...]


CASES = [
    Case("bit-flip-in-chunk", _flip_in_chunk, ("states/c/1/0/0/0 (store rows 48-63)", "crc32c checksum")),
    Case("bit-flip-in-shard-index", _flip_in_index, ("states/c/1/0/0/0 (store rows 32-63)", "shard index")),
    Case("64-random-bytes", _random_bytes, ("states/c/0/0/0/0 (store rows 0-15)", "crc32c checksum")),
    Case("truncated-shard", _truncate, ("states/c/1/0/0/0 (store rows 32-63)", "truncated")),
    Case("empty-shard-file", _empty, ("states/c/2/0/0/0 (store rows 64-79)", "truncated (0 bytes")),
    Case(
        "missing-shard-file",
        lambda store: (store / "states/c/2/0/0/0").unlink(),
        ("states/c/2/0/0/0 (store rows 64-79)", "missing"),
    ),
    Case(
        "deleted-zarr-json",
        lambda store: (store / "zarr.json").unlink(),
        ("store.zarr: not a readable Zarr v3 activation store (its zarr.json is missing)",),
    ),
    Case(
        "unreadable-zarr-json",
        lambda store: (store / "zarr.json").write_text('{"zarr_format": 3, "node_'),
        ("store.zarr/zarr.json: not a readable Zarr v3 group",),
    ),
    Case(
        "deleted-states-metadata",
        lambda store: (store / "states/zarr.json").unlink(),
        ("states/zarr.json", "array 'states' is missing"),
    ),
    Case(
        "edited-model-name",
        _edit_attributes(_set_provenance("model_name", "Other-Model")),
        ("model_name: store has 'Other-Model', expected 'Tiny+OCR'",),
    ),
    Case(
        "edited-model-dtype",
        _edit_attributes(_set_provenance("model_dtype", "float16")),
        ("model_dtype: store has 'float16', expected 'float32'",),
    ),
    Case(
        "edited-layers",
        _edit_attributes(_set_provenance("layers", [1, 2])),
        ("layers: store has [1, 2], expected [1, 3]",),
    ),
    Case(
        "provenance-field-removed",
        _edit_attributes(_drop_provenance("hidden_size")),
        ("attribute 'provenance' is malformed", "field 'hidden_size' is missing"),
    ),
    Case(
        "provenance-field-wrong-type",
        _edit_attributes(_set_provenance("layers", "1,3")),
        ("attribute 'provenance' is malformed", "field 'layers' must be a non-empty list of int"),
    ),
    Case(
        "complete-flag-false",
        _edit_attributes(_set("complete", False)),
        ("attribute 'complete' is not true", "extraction did not finish"),
    ),
    Case("format-1", _edit_attributes(_set("format", 1)), ("attribute 'format' is 1, this code reads format 2",)),
    Case(
        "row-id-bit-flip",
        lambda store: flip_bit(store / "row_id/c/0", 5),
        ("row_id/c/0 (store rows 0-79)", "crc32c checksum"),
    ),
    Case(
        "row-id-file-missing",
        lambda store: (store / "row_id/c/0").unlink(),
        ("row_id/c/0 (store rows 0-79)", "the row ids' file is missing"),
    ),
    Case("no-store", lambda store: shutil.rmtree(store), ("store.zarr: no activation store here",)),
]
# Damage that only a read of the states finds: checked on the cluster path too (RUNS).
ON_CLUSTER = ("bit-flip-in-chunk", "row-id-file-missing")


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Path]:
    """A run folder: a model folder's metadata, a sound store, its index and the sweep's earlier outputs."""
    root = tmp_path_factory.mktemp("run")
    params = store_params(fake_embedded_folder(root / "model"))
    write_sound_store(root / "store.zarr", expected_provenance(params))
    row_ids = list(range(FIRST_ROW_ID, FIRST_ROW_ID + ROWS))
    columns: dict[str, list] = {column: [None] * ROWS for column in INDEX_COLUMNS}
    columns.update(
        row_id=row_ids,
        request_id=[f"r{i}" for i in row_ids],
        source=["a", "b"] * (ROWS // 2),
        category=["c"] * ROWS,
        split=(["train"] * 4 + ["val", "calib", "test", "test"]) * (ROWS // 8),
        label=[i % 2 for i in range(ROWS)],
        image_kind=["none"] * ROWS,
        text=[f"request {i}" for i in row_ids],
    )
    pl.DataFrame(columns).write_parquet(root / "index.parquet")
    out = root / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"best": {"fusion_layer": 3, "safety_layer": 1}}))
    (out / "sweep_plot.json").write_text("[]")
    (out / "val_auroc.png").write_bytes(b"\x89PNG earlier heatmap")
    return params, root


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {
        file.relative_to(folder).as_posix(): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(folder.rglob("*"))
        if file.is_file()
    }


# Every case in process; the cases only a read of the states finds also on a cluster (params.yaml's auto on a
# multi-core machine), where the workers read the store, not this process.
RUNS = [pytest.param(case, "", id=case.name) for case in CASES] + [
    pytest.param(case, "local:2", id=f"{case.name}-on-a-cluster") for case in CASES if case.name in ON_CLUSTER
]


@pytest.mark.parametrize(("case", "address"), RUNS)
def test_a_bad_store_stops_the_stage_naming_what_is_wrong_and_changes_nothing(
    case: Case,
    address: str,
    sound: tuple[Params, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params, source = sound
    params = replace(params, cluster=ClusterConfig(address=address, connect_timeout_s=120))
    stage_stops_naming_the_damage(case, params, source, tmp_path, monkeypatch, capsys)


def stage_stops_naming_the_damage(
    case: Case,
    params: Params,
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Run the sweep stage on a damaged copy of ``source``: one ``error:`` line naming the damage, no file changed."""
    run = Path(shutil.copytree(source, tmp_path / "run"))
    case.damage(run / "store.zarr")
    monkeypatch.setattr(sweep_stage, "load_params", lambda: params)
    monkeypatch.setattr(sweep_stage, "STORE", run / "store.zarr")
    monkeypatch.setattr(sweep_stage, "INDEX", run / "index.parquet")
    monkeypatch.setattr(sweep_stage, "OUT", run / "sweep")
    monkeypatch.setattr(sweep_stage, "SWEEP", run / "sweep" / "sweep.json")
    monkeypatch.setattr(sweep_stage, "SWEEP_PLOT", run / "sweep" / "sweep_plot.json")
    model = Path(params.model.path)  # the folder params.yaml names, outside the copy
    before = (file_hashes(run), file_hashes(model))

    with pytest.raises(SystemExit) as exit_info:
        run_stage(sweep_stage.main)

    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    for fragment in case.names:
        assert fragment in errors[0], errors[0]
    assert (file_hashes(run), file_hashes(model)) == before
