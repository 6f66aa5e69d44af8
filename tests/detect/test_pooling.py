"""Pooled stores and the detectors that read them: ``extract.pooling`` and ``extract.layers: all``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from transformers import PreTrainedTokenizerBase

from pipeline.config import VARIANTS, ContrastivePrompts, ExtractConfig, TrainConfig, pooled_variants
from pipeline.detect.detector import HS_DELTA, LSI, PLAIN, LinearDetector, LSIDetector
from pipeline.detect.extraction import extract_to_store, requests_from_index, store_provenance
from pipeline.detect.features import StoreFeatures, feature_view, pooled_features, states_for_requests
from pipeline.detect.heldout import fit_detector, in_source_setting, load_eval_data
from pipeline.detect.pieces import Piece
from pipeline.detect.probe import LSIProbe, ProbeMeta
from pipeline.detect.shipped import load_detector, save_detector
from pipeline.detect.store import ActivationStore
from pipeline.detect.store_schema import Provenance, StoreError
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.ocr import OCRLine
from pipeline.testing.tiny_embedded import HIDDEN, LAYERS, tiny_embedded, tiny_llama

PROMPTS = ContrastivePrompts()
FAST = TrainConfig(epochs=3, batch_size=8)


@pytest.fixture(scope="module")
def adapter(gguf_tokenizer: PreTrainedTokenizerBase) -> EmbeddedAdapter:
    line = OCRLine(text="How to pick a lock", box=[[0.0, 0.0], [9.0, 0.0], [9.0, 9.0], [0.0, 9.0]], score=0.99)
    return tiny_embedded(tiny_llama(gguf_tokenizer, seed=4), gguf_tokenizer, (line,))


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    folder = tmp_path_factory.mktemp("imgs")
    rows = []
    for i in range(16):
        image = None
        if i % 4 == 1:
            image = folder / f"{i}.png"
            Image.new("RGB", (30, 20), (10 * i, 90, 200)).save(image)
        rows.append(
            {
                "row_id": 100 + i,
                "text": f"{'how do I hurt' if i % 2 else 'how do I help'} someone, question {i}" + " please" * (i % 5),
                "image_path": str(image) if image else None,
                "label": i % 2,
                "split": ("train", "train", "val", "test")[(i // 2) % 4],
            }
        )
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def stores(adapter: EmbeddedAdapter, index: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One store per pooling, every block stored (``layers: all``)."""
    folder = tmp_path_factory.mktemp("stores")
    paths = {}
    for pooling in ("last", "mean", "both"):
        config = ExtractConfig(layers="all", pooling=pooling, batch_size=5, shard_rows=8)
        paths[pooling] = folder / f"{pooling}.zarr"
        extract_to_store(adapter, index, PROMPTS, config, paths[pooling], progress=False)
    return paths


def test_pooled_features_put_each_framings_reads_side_by_side() -> None:
    states = np.arange(2 * 6 * 1 * 2, dtype=np.float32).reshape(2, 6, 1, 2)  # 2 reads x 3 framings
    features = pooled_features(states, 2)
    assert features.shape == (2, 3, 1, 4)
    np.testing.assert_array_equal(features[:, 1, 0], np.concatenate([states[:, 1, 0], states[:, 4, 0]], axis=1))
    assert pooled_features(states, 1) is states
    with pytest.raises(ValueError, match="not 4 reads"):
        pooled_features(states, 4)


def test_stores_record_their_pooling_and_every_block(stores: dict[str, Path], adapter: EmbeddedAdapter) -> None:
    for pooling, path in stores.items():
        store = ActivationStore.open(path)
        assert store.provenance.pooling == pooling
        assert store.provenance.layers == tuple(range(LAYERS))  # layers: all, resolved from the adapter
        assert store.provenance.variants == pooled_variants(VARIANTS, pooling)
        assert store.provenance == store_provenance(adapter, PROMPTS, tuple(range(LAYERS)), pooling)
    both = ActivationStore.open(stores["both"]).states().compute()
    last = ActivationStore.open(stores["last"]).states().compute()
    mean = ActivationStore.open(stores["mean"]).states().compute()
    # The last-token reads of a `both` store are those a `last` store holds, and likewise the means.
    # float16 storage: one unit in the last place of the tiny model's small states, at most.
    np.testing.assert_allclose(both[:, :3], last, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(both[:, 3:], mean, rtol=1e-3, atol=1e-4)
    assert np.abs(both[:, 3:] - both[:, :3]).max() > 1e-2  # the means are not the last tokens


def test_stored_means_are_the_adapters(stores: dict[str, Path], adapter: EmbeddedAdapter, index: pl.DataFrame) -> None:
    layers = list(range(LAYERS))
    direct = states_for_requests(adapter, requests_from_index(index.sort("row_id")), PROMPTS, layers, "mean").numpy()
    stored = ActivationStore.open(stores["mean"]).states().compute().astype(np.float32)
    np.testing.assert_allclose(stored, direct, rtol=1e-3, atol=1e-4)  # float16 storage


def test_feature_view_concatenates_last_and_mean(stores: dict[str, Path]) -> None:
    store = ActivationStore.open(stores["both"])
    view = feature_view(store, [0, 2]).compute()
    assert view.shape == (store.num_rows, 3, 2, 2 * HIDDEN)
    raw = store.layer_states([0, 2]).compute()
    np.testing.assert_array_equal(view, pooled_features(raw, 2))
    mean = ActivationStore.open(stores["mean"])
    np.testing.assert_array_equal(feature_view(mean, [1]).compute(), mean.layer_states([1]).compute())


def test_a_store_of_another_pooling_is_refused(
    stores: dict[str, Path], adapter: EmbeddedAdapter, index: pl.DataFrame
) -> None:
    expected = store_provenance(adapter, PROMPTS, tuple(range(LAYERS)), "last")
    with pytest.raises(StoreError, match=r"pooling: store has 'both', expected 'last'"):
        ActivationStore.open(stores["both"], expected=expected)
    with pytest.raises(StoreError, match="pooling: store has 'last', expected 'mean'"):
        config = ExtractConfig(layers="all", pooling="mean", batch_size=5, shard_rows=8)
        extract_to_store(adapter, index, PROMPTS, config, stores["last"], progress=False)


def test_a_store_without_a_recorded_pooling_reads_as_last(tmp_path: Path) -> None:
    provenance = Provenance(
        model_name="m",
        model_revision="r",
        model_dtype="float32",
        template_benign="b {q}",
        template_malicious="m {q}",
        variants=VARIANTS,
        layers=(0,),
        hidden_size=2,
    )
    store = ActivationStore.create(tmp_path / "old.zarr", [1], provenance, shard_rows=1)
    raw = provenance.to_json()
    del raw["pooling"]
    store.group.attrs["provenance"] = raw
    store.write_block(0, np.zeros((1, 3, 1, 2), dtype=np.float32))
    store.mark_complete()
    reopened = ActivationStore.open(tmp_path / "old.zarr", expected=provenance)
    assert reopened.provenance.pooling == "last"
    problems = Provenance.problems({**raw, "pooling": "max"})
    assert problems == ["field 'pooling' must be one of ['last', 'mean', 'both'], got 'max'"]


@pytest.mark.parametrize("pooling", ["mean", "both"])
def test_detectors_read_the_stores_pooled_features(
    stores: dict[str, Path], index: pl.DataFrame, pooling: str, tmp_path: Path
) -> None:
    store = ActivationStore.open(stores[pooling])
    data = load_eval_data(index, store)
    width = HIDDEN * (2 if pooling == "both" else 1)
    assert data.pooling == pooling and data.states.shape[-1] == width
    setting = in_source_setting(index)
    for name in (LSI, PLAIN, HS_DELTA):
        detector = fit_detector(data, setting, name, FAST, 2, 1)
        assert detector.pooling == pooling and f"({pooling} pooling)" in detector.describe()
        expected_width = 2 * width if name != PLAIN else width
        assert detector.n_features_in_ == expected_width
    # LSI's h_s and delta_h are the pooled features, as StoreFeatures streams them for training.
    source = StoreFeatures(
        store=store,
        row_ids=index["row_id"].to_numpy(),
        labels=data.labels,
        fusion_layer=2,
        safety_layer=1,
        chunk_rows=5,
    )
    streamed = source.read(0, len(source))
    order = np.argsort(index["row_id"].to_numpy())
    np.testing.assert_array_equal(streamed.h_s, data.lsi(order, 2, 1).h_s)
    np.testing.assert_array_equal(streamed.delta_h, data.lsi(order, 2, 1).delta_h)
    # A shipped detector records its pooling and comes back reading the same features.
    lsi = fit_detector(data, setting, LSI, FAST, 2, 1)
    meta = ProbeMeta(
        hidden_size=HIDDEN,
        alpha=FAST.alpha,
        fusion_layer=2,
        safety_layer=1,
        best_epoch=0,
        best_val_auroc=1.0,
        store_provenance=store.provenance.to_json(),
        pooling=pooling,
    )
    save_detector(lsi, meta, tmp_path / "probe")
    loaded, loaded_meta = load_detector(tmp_path / "probe")
    assert isinstance(loaded, LSIDetector) and loaded.pooling == loaded_meta.pooling == pooling
    np.testing.assert_allclose(data.scores(loaded, setting.test), data.scores(lsi, setting.test), rtol=1e-6)


def test_a_linear_detector_of_the_wrong_width_for_its_pooling_is_refused(
    stores: dict[str, Path], index: pl.DataFrame, tmp_path: Path
) -> None:
    data = load_eval_data(index, ActivationStore.open(stores["both"]))
    detector = fit_detector(data, in_source_setting(index), PLAIN, FAST, 2, 1)
    assert isinstance(detector, LinearDetector)
    meta = ProbeMeta(
        hidden_size=HIDDEN,
        alpha=0.1,
        fusion_layer=2,
        safety_layer=1,
        best_epoch=-1,
        best_val_auroc=1.0,
        store_provenance={},
        detector=PLAIN,
        pieces=[p.label() for p in detector.pieces],
        pooling="both",
    )
    save_detector(detector, meta, tmp_path)
    assert load_detector(tmp_path)[0].pooling == "both"
    with pytest.raises(ValueError, match="metadata names pooling 'last'"):
        save_detector(detector, ProbeMeta(**{**meta.__dict__, "pooling": "last"}), tmp_path)
    text = (tmp_path / "probe.json").read_text().replace('"pooling": "both"', '"pooling": "mean"')
    (tmp_path / "probe.json").write_text(text)
    with pytest.raises(ValueError, match=r"piece\(s\) of hidden size"):
        load_detector(tmp_path)


def test_detectors_refuse_an_unknown_pooling() -> None:
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        LSIDetector.from_probe(LSIProbe(2), 1, 0, "max")
    x, y = np.random.default_rng(0).normal(size=(8, 2)), np.arange(8) % 2
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        LinearDetector(PLAIN, (Piece("plain", 1),), pooling="max").fit(x, y)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        LSIDetector(pooling="max").fit(x, y)
