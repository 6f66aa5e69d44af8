"""Extraction into a store, and reading LSI features back in any row order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipeline.config import ExtractConfig
from pipeline.extraction import ExtractionError, extract_to_store, store_provenance
from pipeline.features import (
    aligned_features,
    features_from_states,
    lsi_features,
    states_for_requests,
)
from pipeline.models.base import Request
from pipeline.models.hf_vlm import HFVisionLanguageAdapter
from pipeline.prompts import ContrastivePrompts
from pipeline.store import ActivationStore, StoreError

LAYERS = (0, 1, 3)


@pytest.fixture(scope="module")
def adapter(tiny_llava_folder: Path) -> HFVisionLanguageAdapter:
    return HFVisionLanguageAdapter.from_folder(tiny_llava_folder, device="cpu")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    folder = tmp_path_factory.mktemp("imgs")
    rows = []
    for i in range(11):
        image = None
        if i % 3 != 0:
            image = folder / f"{i}.png"
            Image.new("RGB", (40, 30), (20 * i, 100, 255 - 20 * i)).save(image)
        rows.append(
            {
                "row_id": 10 + i,
                "text": f"request number {i} " + "word " * i,
                "image_path": str(image) if image else None,
            }
        )
    return pl.DataFrame(rows)


def test_store_holds_the_adapters_states(adapter: HFVisionLanguageAdapter, index: pl.DataFrame, tmp_path: Path) -> None:
    prompts = ContrastivePrompts()
    store = extract_to_store(
        adapter,
        index,
        prompts,
        ExtractConfig(layers=LAYERS, batch_size=3, shard_rows=4),
        tmp_path / "s.zarr",
        progress=False,
    )
    assert store.num_rows == 11 and store.row_ids.tolist() == index["row_id"].to_list()
    assert store.provenance == store_provenance(adapter, prompts, LAYERS)
    requests = [Request(t, Path(p) if p else None) for t, p in zip(index["text"], index["image_path"], strict=True)]
    direct = states_for_requests(adapter, requests, prompts, LAYERS).numpy()
    stored = ActivationStore.open(tmp_path / "s.zarr").states().compute().astype(np.float32)
    np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=2e-3)  # float16 storage


def test_features_follow_the_callers_row_order(
    adapter: HFVisionLanguageAdapter, index: pl.DataFrame, tmp_path: Path
) -> None:
    prompts = ContrastivePrompts()
    store = extract_to_store(
        adapter, index, prompts, ExtractConfig(layers=LAYERS, shard_rows=5), tmp_path / "s.zarr", progress=False
    )
    wanted = np.array([17, 10, 20, 13])
    features = aligned_features(store, wanted, fusion_layer=3, safety_layer=0)
    all_states = store.states().compute()
    positions = [int(np.where(store.row_ids == r)[0][0]) for r in wanted]
    expected = features_from_states(all_states[positions], LAYERS, 3, 0)
    np.testing.assert_array_equal(features.h_s, expected.h_s)
    np.testing.assert_array_equal(features.delta_h, expected.delta_h)
    with pytest.raises(ValueError, match=r"rows \[999\] of the index are not in the store"):
        aligned_features(store, np.array([999]), 3, 0)


def test_live_features_match_stored(adapter: HFVisionLanguageAdapter, index: pl.DataFrame, tmp_path: Path) -> None:
    prompts = ContrastivePrompts()
    store = extract_to_store(adapter, index, prompts, ExtractConfig(layers=LAYERS), tmp_path / "s.zarr", progress=False)
    requests = [
        Request(t, Path(p) if p else None) for t, p in zip(index["text"][:4], index["image_path"][:4], strict=True)
    ]
    live = lsi_features(adapter, requests, prompts, fusion_layer=3, safety_layer=1)
    stored = aligned_features(store, index["row_id"].to_numpy()[:4], 3, 1)
    np.testing.assert_allclose(live.h_s, stored.h_s, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(live.delta_h, stored.delta_h, atol=4e-3, rtol=4e-3)


def test_unreadable_image_names_the_rows(adapter: HFVisionLanguageAdapter, index: pl.DataFrame, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = index.with_columns(
        pl.when(pl.col("row_id") == 15).then(pl.lit(str(broken))).otherwise(pl.col("image_path")).alias("image_path")
    )
    with pytest.raises(ExtractionError, match=r"index rows \[.*15.*\]: .*broken.png"):
        extract_to_store(
            adapter, bad, ContrastivePrompts(), ExtractConfig(layers=LAYERS), tmp_path / "s.zarr", progress=False
        )
    # the unfinished store is never mistaken for a finished one
    with pytest.raises(StoreError, match="did not finish"):
        ActivationStore.open(tmp_path / "s.zarr")
