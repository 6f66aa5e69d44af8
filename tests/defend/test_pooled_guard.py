"""A guard over a detector trained on pooled features computes, live, the features extraction stored."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from transformers import PreTrainedTokenizerBase

from pipeline.config import ContrastivePrompts, ExtractConfig, TrainConfig, pooling_reads
from pipeline.defend.guard import Guard
from pipeline.detect.detector import HS_DELTA, LSI, PLAIN, Detector
from pipeline.detect.extraction import extract_to_store, requests_from_index
from pipeline.detect.features import pooled_features, states_for_requests
from pipeline.detect.heldout import fit_detector, in_source_setting, load_eval_data
from pipeline.detect.probe import ProbeMeta
from pipeline.detect.store import ActivationStore
from pipeline.explain.attribution import intent_attribution
from pipeline.explain.targets import detector_target
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.ocr import OCRLine
from pipeline.testing.tiny_embedded import HIDDEN, tiny_embedded, tiny_llama

# Standardised inputs and a large step: the tiny model's states are small, and an untrained probe
# would score every feature alike, hiding a wrong one.
FAST = TrainConfig(epochs=4, batch_size=4, lr=0.05, standardize=True)
FUSION, SAFETY = 2, 1


@pytest.fixture(scope="module")
def adapter(gguf_tokenizer: PreTrainedTokenizerBase) -> EmbeddedAdapter:
    line = OCRLine(text="Mix the two powders", box=[[0.0, 0.0], [9.0, 0.0], [9.0, 9.0], [0.0, 9.0]], score=0.99)
    return tiny_embedded(tiny_llama(gguf_tokenizer, seed=5), gguf_tokenizer, (line,))


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    folder = tmp_path_factory.mktemp("imgs")
    rows = []
    for i in range(12):
        image = None
        if i % 3 == 2:
            image = folder / f"{i}.png"
            Image.new("RGB", (24, 24), (20 * i, 50, 90)).save(image)
        rows.append(
            {
                "row_id": i,
                "text": ("explain how to poison a dog" if i % 2 else "explain how to feed a dog") + " now" * (i % 4),
                "image_path": str(image) if image else None,
                "label": i % 2,
                "split": ("train", "train", "val", "test")[(i // 2) % 4],
            }
        )
    return pl.DataFrame(rows)


def trained(
    adapter: EmbeddedAdapter, index: pl.DataFrame, prompts: ContrastivePrompts, pooling: str, name: str, path: Path
) -> tuple[Detector, ProbeMeta, ActivationStore, np.ndarray]:
    """A detector fitted on a store extracted under ``pooling``, its metadata, the store and its scores of every row."""
    config = ExtractConfig(layers=(0, FUSION, SAFETY), pooling=pooling, batch_size=4, shard_rows=4)
    store = extract_to_store(adapter, index, prompts, config, path, progress=False)
    data = load_eval_data(index, store)
    detector = fit_detector(data, in_source_setting(index), name, FAST, FUSION, SAFETY)
    meta = ProbeMeta(
        hidden_size=HIDDEN,
        alpha=FAST.alpha,
        fusion_layer=FUSION,
        safety_layer=SAFETY,
        best_epoch=0,
        best_val_auroc=1.0,
        store_provenance=store.provenance.to_json(),
        detector=name,
        pieces=[p.label() for p in getattr(detector, "pieces", ())],
        pooling=pooling,
    )
    return detector, meta, store, data.scores(detector, np.arange(len(index)))


@pytest.mark.parametrize(
    ("pooling", "name", "position"),
    [("mean", LSI, "before"), ("both", LSI, "after"), ("both", HS_DELTA, "before")],
)
def test_guard_scores_equal_the_stored_features_scores(
    adapter: EmbeddedAdapter, index: pl.DataFrame, tmp_path: Path, pooling: str, name: str, position: str
) -> None:
    prompts = ContrastivePrompts(position=position)
    detector, meta, _, stored = trained(adapter, index, prompts, pooling, name, tmp_path / "s.zarr")
    guard = Guard(adapter=adapter, detector=detector, meta=meta, tau=0.5, prompts=prompts)
    requests = requests_from_index(index)
    live = guard.scores(requests)  # the batched check
    # Extraction's own computation (compute_rows), before the store rounds it to float16.
    extracted = states_for_requests(adapter, requests, prompts, list(detector.layers), pooling).numpy()
    features = pooled_features(extracted, len(pooling_reads(pooling)))
    np.testing.assert_allclose(live, detector.score_states(features, list(detector.layers)), rtol=0, atol=1e-4)
    np.testing.assert_allclose(live, stored, rtol=0, atol=5e-3)  # the store holds float16
    assert np.ptp(live) > 0.2  # the detector tells requests apart: a wrong feature would show
    for request, batched in zip(requests[:4], live[:4], strict=True):
        session, score = guard.session_score(request)  # the check that shares its cache with the answer
        assert session is not None
        assert score == pytest.approx(float(batched), abs=1e-4)  # standardised inputs magnify float noise


def test_guard_refuses_a_detector_whose_pooling_is_not_its_stores(
    adapter: EmbeddedAdapter, index: pl.DataFrame, tmp_path: Path
) -> None:
    prompts = ContrastivePrompts()
    detector, meta, _, _ = trained(adapter, index, prompts, "both", HS_DELTA, tmp_path / "s.zarr")
    store_says_last = replace(meta, store_provenance={**meta.store_provenance, "pooling": "last"})
    with pytest.raises(ValueError, match="pooling differs"):
        Guard(adapter=adapter, detector=detector, meta=store_says_last, tau=0.5, prompts=prompts)
    with pytest.raises(ValueError, match="pooling differs"):
        Guard(adapter=adapter, detector=detector, meta=replace(meta, pooling="mean"), tau=0.5, prompts=prompts)


@pytest.mark.parametrize(
    ("pooling", "name", "position"),
    [("mean", LSI, "before"), ("both", LSI, "after"), ("both", PLAIN, "after"), ("both", HS_DELTA, "before")],
)
def test_attribution_of_a_pooled_detector_integrates_the_guards_own_logit(
    adapter: EmbeddedAdapter, index: pl.DataFrame, tmp_path: Path, pooling: str, name: str, position: str
) -> None:
    prompts = ContrastivePrompts(position=position)
    detector, meta, _, _ = trained(adapter, index, prompts, pooling, name, tmp_path / "s.zarr")
    guard = Guard(adapter=adapter, detector=detector, meta=meta, tau=0.5, prompts=prompts)
    target = detector_target(detector)
    assert target.pooling == pooling
    requests = requests_from_index(index)
    text_only, with_image = requests[0], requests[2]  # row 2 holds an image the OCR reads a line from
    assert text_only.image is None and with_image.image is not None
    for request in (text_only, with_image):
        attribution = intent_attribution(adapter, request, prompts, target, steps=4)
        # The signal at the input is the logit the guard thresholds: the mean read covers the same
        # tokens (request text and OCR text) as extraction's.
        score = float(guard.scores([request])[0])
        assert attribution.signal == pytest.approx(float(np.log(score / (1 - score))), abs=2e-3)
