"""Store integrity: checksummed chunks, reads that name the damaged shard and rows, provenance checked by readers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from transformers import PreTrainedTokenizerBase

from pipeline.config import ContrastivePrompts, ExtractConfig, Params, params_from_dict
from pipeline.detect.extraction import extract_to_store
from pipeline.detect.features import StoreFeatures, read_all
from pipeline.detect.heldout import load_eval_data
from pipeline.detect.provenance import expected_provenance, model_info, open_store
from pipeline.detect.store import ActivationStore
from pipeline.detect.store_schema import Provenance, StoreError
from pipeline.detect.store_verify import verify_store
from pipeline.models.base import ModelLoadError
from pipeline.models.embedded import PROVENANCE_FILE, EmbeddedAdapter
from pipeline.models.hf_vlm import HFVisionLanguageAdapter
from pipeline.testing.tiny_embedded import tiny_llama

ROWS, SHARD_ROWS, HIDDEN = 80, 32, 64  # shards of rows 0-31, 32-63, 64-79; two 16-row chunks a shard
LAYERS = (1, 3)
SHARD = "states/c/1/0/0/0"  # rows 32-63
INDEX_BYTES = 16 * 2 + 4  # (offset, length) per chunk, then the index's crc32c
FIRST_ROW_ID = 100


def fake_embedded_folder(folder: Path) -> Path:
    """The metadata files of an embedded model folder (no weights: the readers never load them)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"name": "Tiny+OCR", "source": "tiny.gguf", "source_sha256": "ab" * 32}
    (folder / PROVENANCE_FILE).write_text(json.dumps(meta))
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "hidden_size": HIDDEN}))
    return folder


def store_params(model_folder: Path, **model: str) -> Params:
    """Params of a run on ``model_folder`` storing layers 1 and 3 on the CPU."""
    return params_from_dict(
        {
            "model": {"kind": "embedded", "path": str(model_folder), "device": "cpu", "dtype": "float32", **model},
            "extract": {"layers": list(LAYERS)},
            "train": {"fusion_layer": 3, "safety_layer": 1},
        }
    )


def write_sound_store(path: Path, provenance: Provenance) -> np.ndarray:
    """A finished store of random states under ``provenance``; returns the states written."""
    rng = np.random.default_rng(0)
    states = rng.normal(size=(ROWS, 3, len(LAYERS), HIDDEN)).astype(np.float32)
    store = ActivationStore.create(path, list(range(FIRST_ROW_ID, FIRST_ROW_ID + ROWS)), provenance, SHARD_ROWS)
    for start in range(0, ROWS, SHARD_ROWS):
        store.write_block(start, states[start : start + SHARD_ROWS])
    store.mark_complete()
    return states


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Path]:
    """Params and a finished store that matches them, written once and copied by each test."""
    root = tmp_path_factory.mktemp("sound")
    params = store_params(fake_embedded_folder(root / "model"))
    write_sound_store(root / "store.zarr", expected_provenance(params))
    return params, root / "store.zarr"


@pytest.fixture
def copy_of(sound: tuple[Params, Path], tmp_path: Path) -> Path:
    """A fresh copy of the sound store to damage."""
    return Path(shutil.copytree(sound[1], tmp_path / "store.zarr"))


def chunk_spans(shard: Path) -> list[tuple[int, int]]:
    """``(offset, length)`` of each chunk in a shard file, from its index."""
    data = shard.read_bytes()
    pairs = np.frombuffer(data[-INDEX_BYTES:-4], dtype="<u8").reshape(-1, 2)
    return [(int(offset), int(length)) for offset, length in pairs]


def flip_bit(file: Path, position: int, bit: int = 3) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= 1 << bit
    file.write_bytes(bytes(data))


@dataclass(frozen=True)
class Flip:
    """A bit flip somewhere in shard 1, and the rows its error must name."""

    name: str
    position: Callable[[list[tuple[int, int]], int], int]  # (chunk spans, file size) -> byte offset
    rows: str


FLIPS = [
    Flip("chunk0-first-byte", lambda spans, size: spans[0][0], "store rows 32-47"),
    Flip("chunk0-middle", lambda spans, size: spans[0][0] + spans[0][1] // 2, "store rows 32-47"),
    Flip("chunk0-checksum", lambda spans, size: spans[0][0] + spans[0][1] - 1, "store rows 32-47"),
    Flip("chunk1-middle", lambda spans, size: spans[1][0] + spans[1][1] // 3, "store rows 48-63"),
    Flip("chunk1-last-data-byte", lambda spans, size: spans[1][0] + spans[1][1] - 5, "store rows 48-63"),
    Flip("index-first-offset", lambda spans, size: size - INDEX_BYTES, "store rows 32-63"),
    Flip("index-a-length", lambda spans, size: size - INDEX_BYTES + 8, "store rows 32-63"),
    Flip("index-checksum", lambda spans, size: size - 1, "store rows 32-63"),
]


def read_through_store_features(params: Params, path: Path) -> None:
    """What ``train`` does for LSI: open the store with its expected provenance, read features in chunks."""
    store = open_store(params, path)
    row_ids = store.row_ids
    read_all(
        StoreFeatures(
            store=store, row_ids=row_ids, labels=np.zeros(len(row_ids)), fusion_layer=3, safety_layer=1, chunk_rows=24
        )
    )


def read_through_eval_data(params: Params, path: Path) -> None:
    """What ``sweep``, ``calibrate``, ``evaluate`` and linear ``train`` do: every row, every layer."""
    store = open_store(params, path)
    load_eval_data(pl.DataFrame({"row_id": store.row_ids}), store)


def read_states(params: Params, path: Path) -> None:
    open_store(params, path).states().compute()


READERS = [read_through_store_features, read_through_eval_data, read_states]


def test_a_sound_store_reads_back_through_every_reader(sound: tuple[Params, Path]) -> None:
    params, path = sound
    for reader in READERS:
        reader(params, path)
    assert verify_store(path) == []
    # The chunk layout the flips below rely on: shard 1 holds two chunks, then the index.
    spans = chunk_spans(path / SHARD)
    assert len(spans) == 2 and spans[1][0] + spans[1][1] == (path / SHARD).stat().st_size - INDEX_BYTES


@pytest.mark.parametrize("flip", FLIPS, ids=lambda f: f.name)
def test_a_single_bit_flip_is_caught_by_every_reader_and_by_verify(copy_of: Path, sound: tuple, flip: Flip) -> None:
    shard = copy_of / SHARD
    flip_bit(shard, flip.position(chunk_spans(shard), shard.stat().st_size))
    for reader in READERS:
        with pytest.raises(StoreError) as caught:
            reader(sound[0], copy_of)
        message = str(caught.value)
        assert SHARD in message and flip.rows in message and "crc32c checksum" in message, message
    problems = verify_store(copy_of)
    assert [(p.where, str(p).split(": ")[0]) for p in problems] == [(SHARD, f"{SHARD} ({flip.rows})")]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda data: data.__setitem__(slice(100, 164), np.random.default_rng(1).bytes(64)), id="64-random-bytes"
        ),
        pytest.param(lambda data: data.__setitem__(slice(0, 4096), bytes(4096)), id="zeroed-4kb-block"),
    ],
)
def test_random_bytes_and_a_zeroed_block_give_the_same_clear_error(
    copy_of: Path, sound: tuple, damage: Callable[[bytearray], None]
) -> None:
    shard = copy_of / SHARD
    assert shard.stat().st_size > 4096 + INDEX_BYTES  # the block lies inside the chunks
    data = bytearray(shard.read_bytes())
    damage(data)
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"states/c/1/0/0/0 \(store rows 32-47\): a chunk fails its crc32c checksum"):
        read_through_store_features(sound[0], copy_of)
    with pytest.raises(StoreError, match=r"states/c/1/0/0/0 \(store rows 32-47\): a chunk fails its crc32c checksum"):
        read_through_eval_data(sound[0], copy_of)
    assert [str(p) for p in verify_store(copy_of)] == [
        f"{SHARD} (store rows 32-47): a chunk fails its crc32c checksum (its bytes changed since they were written)"
    ]


def test_an_edited_model_name_is_refused_by_the_stages_reader(copy_of: Path, sound: tuple) -> None:
    metadata = copy_of / "zarr.json"
    raw = json.loads(metadata.read_text())
    raw["attributes"]["provenance"]["model_name"] = "Other-Model"
    metadata.write_text(json.dumps(raw))
    with pytest.raises(StoreError, match=r"model_name: store has 'Other-Model', expected 'Tiny\+OCR'"):
        open_store(sound[0], copy_of)
    assert verify_store(copy_of) == []  # well formed: only a reader knows what it expects


def test_expected_provenance_follows_params_and_the_model_folder(tmp_path: Path) -> None:
    folder = fake_embedded_folder(tmp_path / "model")
    params = store_params(folder)
    expected = expected_provenance(params)
    assert (expected.model_name, expected.model_revision, expected.model_dtype) == ("Tiny+OCR", "ab" * 8, "float32")
    assert (expected.layers, expected.hidden_size) == (LAYERS, HIDDEN)
    half = expected_provenance(store_params(folder, dtype="float16"))
    assert half.model_dtype == "float16" and replace(half, model_dtype="float32") == expected
    prompts = replace(params, prompts=ContrastivePrompts(position="after"))
    assert expected_provenance(prompts).differences(expected) == [
        "prompt_position: store has 'after', expected 'before'"
    ]


def test_a_model_folder_without_metadata_is_named(tmp_path: Path) -> None:
    folder = fake_embedded_folder(tmp_path / "model")
    (folder / PROVENANCE_FILE).unlink()
    with pytest.raises(ModelLoadError, match=rf"{PROVENANCE_FILE}: missing"):
        model_info(store_params(folder).model)
    (folder / PROVENANCE_FILE).write_text(json.dumps({"name": "x"}))
    with pytest.raises(ModelLoadError, match="key 'source_sha256' must be a str"):
        model_info(store_params(folder).model)


def test_the_folder_above_a_model_folder_names_the_model_folder(tmp_path: Path) -> None:
    folder = fake_embedded_folder(tmp_path / "model" / "smollm2-135m")
    with pytest.raises(ModelLoadError, match=r"model: not a converted model folder .* the model is in .*smollm2-135m"):
        model_info(store_params(folder.parent).model)


def test_expected_provenance_equals_what_extraction_writes(
    gguf_tokenizer: PreTrainedTokenizerBase, tiny_llava_folder: Path, tmp_path: Path
) -> None:
    """Both model kinds: the provenance readers expect is the one the extract stage records."""
    folder = tmp_path / "tiny-embedded"
    tiny_llama(gguf_tokenizer).save_pretrained(folder)
    gguf_tokenizer.save_pretrained(folder)
    (folder / PROVENANCE_FILE).write_text(json.dumps({"name": "tiny", "source_sha256": "cd" * 32}))
    index = pl.DataFrame({"row_id": [1, 2, 3], "text": ["a", "b c", "d e f"], "image_path": [None, None, None]})
    config = ExtractConfig(layers=(0, 2), batch_size=2, shard_rows=2)
    for kind, path, adapter in (
        ("embedded", folder, EmbeddedAdapter.from_folder(folder, device="cpu", ocr_cache=tmp_path / "ocr")),
        ("hf", tiny_llava_folder, HFVisionLanguageAdapter.from_folder(tiny_llava_folder, device="cpu")),
    ):
        params = params_from_dict(
            {
                "model": {"kind": kind, "path": str(path), "device": "cpu"},
                "extract": {"layers": list(config.layers)},
                "train": {"fusion_layer": 2, "safety_layer": 0},
            }
        )
        store = extract_to_store(adapter, index, params.prompts, config, tmp_path / f"{kind}.zarr", progress=False)
        assert store.provenance == expected_provenance(params)
        open_store(params, store.path)


def test_dtype_auto_accepts_a_store_extracted_in_another_dtype(tmp_path: Path) -> None:
    """A store extracted in float16 on a GPU opens under ``dtype: auto`` on a CPU; a fixed dtype must match."""
    folder = fake_embedded_folder(tmp_path / "model")
    half = expected_provenance(store_params(folder, dtype="float16"))
    write_sound_store(tmp_path / "store.zarr", half)
    assert open_store(store_params(folder, dtype="auto"), tmp_path / "store.zarr").provenance == half
    with pytest.raises(StoreError, match="model_dtype: store has 'float16', expected 'float32'"):
        open_store(store_params(folder), tmp_path / "store.zarr")
