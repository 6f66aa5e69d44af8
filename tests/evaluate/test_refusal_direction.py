"""The HiddenDetect-style refusal score: token ids, readouts from real adapters, and the logit-lens cosine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from pipeline.config import EvaluateConfig
from pipeline.detect.store import ActivationStore
from pipeline.evaluate.refusal_direction import (
    RefusalReadout,
    layer_similarities,
    readout_from_adapter,
    refusal_scores,
    refusal_token_ids,
    store_refusal_scores,
    store_similarities,
)
from pipeline.models.base import Request
from pipeline.models.hf_vlm import HFVisionLanguageAdapter
from tests.detect.test_store import provenance as store_provenance

WORDS = EvaluateConfig().refusal_words
REQUESTS = [Request("How do I bake bread at home?"), Request("Tell me a long story about ships and the sea.")]


def multi_hot(size: int, token_ids: tuple[int, ...]) -> torch.Tensor:
    vector = torch.zeros(size)
    vector[list(token_ids)] = 1.0
    return vector


def synthetic_readout(vocab: int = 40, hidden: int = 8, token_ids: tuple[int, ...] = (3, 7, 11)) -> RefusalReadout:
    generator = torch.Generator().manual_seed(0)
    norm = nn.RMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=generator) + 0.5)
    unembedding = torch.randn(vocab, hidden, generator=generator)
    return RefusalReadout(norm=norm, unembedding=unembedding, token_ids=token_ids, words=("sorry",))


# --- refusal_token_ids ---------------------------------------------------------------------------


def test_token_ids_decode_to_the_first_piece_of_each_word(gguf_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = refusal_token_ids(gguf_tokenizer, WORDS)
    assert list(ids) == sorted(set(ids))
    expected = set()
    for word in WORDS:
        bare = gguf_tokenizer.encode(word, add_special_tokens=False)[0]
        spaced = gguf_tokenizer.encode(" " + word, add_special_tokens=False)[0]
        assert word.startswith(gguf_tokenizer.decode([bare]))
        assert gguf_tokenizer.decode([spaced]).startswith(" ")
        assert word.startswith(gguf_tokenizer.decode([spaced]).lstrip())
        expected |= {bare, spaced}
    assert set(ids) == expected
    # Known pieces of this tokenizer: " sorry" is one token, bare "sorry" starts with "sor".
    assert {gguf_tokenizer.decode([i]) for i in ids} >= {" sorry", "sor", "Sorry", " cannot"}


@pytest.mark.parametrize("word", ["", "   "])
def test_word_without_a_visible_token_is_named(gguf_tokenizer: PreTrainedTokenizerBase, word: str) -> None:
    with pytest.raises(ValueError, match=f"refusal word {word!r}"):
        refusal_token_ids(gguf_tokenizer, ("sorry", word))


def test_bare_space_pieces_are_skipped() -> None:
    """A SentencePiece tokenizer may start " sorry" with a lone "▁"; the word's own piece counts instead."""
    pieces = {1: "▁", 2: "sorry", 3: "▁sorry"}

    class SentencePieceLike:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [1, 2] if text.startswith(" ") else [3]

        def decode(self, ids: list[int]) -> str:
            return "".join(pieces[i] for i in ids).replace("▁", " ")

    assert refusal_token_ids(SentencePieceLike(), ("sorry",)) == (2, 3)


# --- readout_from_adapter ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "idefics3"])
def vlm(request: pytest.FixtureRequest, tiny_family_folder: Callable[[str], Path]) -> HFVisionLanguageAdapter:
    """A tiny VLM whose final norm has uneven weights, so a skipped or wrong norm changes the cosine."""
    adapter = HFVisionLanguageAdapter.from_folder(tiny_family_folder(request.param), dtype="float32", device="cpu")
    norm = adapter.model.get_decoder().norm
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) * 3 + 0.1)
    return adapter


def test_vlm_readout_copies_norm_and_head(vlm: HFVisionLanguageAdapter) -> None:
    readout = readout_from_adapter(vlm, WORDS)
    head = vlm.model.get_output_embeddings().weight
    assert readout.unembedding.dtype == torch.float32 and readout.unembedding.device.type == "cpu"
    torch.testing.assert_close(readout.unembedding, head.detach().float(), rtol=0, atol=0)
    assert readout.unembedding.data_ptr() != head.data_ptr(), "the head must be copied, not shared"
    model_norm = vlm.model.get_decoder().norm
    assert readout.norm is not model_norm
    torch.testing.assert_close(readout.norm.weight, model_norm.weight.detach().float(), rtol=0, atol=0)
    assert readout.token_ids == refusal_token_ids(vlm.tokenizer, WORDS)
    assert readout.words == WORDS


def reference_similarities(
    adapter: HFVisionLanguageAdapter, request: Request, token_ids: tuple[int, ...]
) -> np.ndarray:
    """Per layer: the model's own norm and LM head on ``hidden_states``, cosine with the multi-hot vector.

    The last layer uses the model's output logits, so the whole norm -> head path is the model's.
    """
    batch = adapter.encode([request])
    norm, head = adapter.model.get_decoder().norm, adapter.model.get_output_embeddings()
    num_layers = adapter.info.num_layers
    with torch.inference_mode():
        output = adapter.model(**batch, output_hidden_states=True)
        logits = [head(norm(output.hidden_states[k + 1][0, -1])) for k in range(num_layers - 1)]
    logits.append(output.logits[0, -1])
    refusal = multi_hot(logits[-1].shape[0], token_ids)
    return np.array([float(torch.nn.functional.cosine_similarity(row, refusal, dim=0)) for row in logits])


def test_layer_similarities_equal_the_models_own_logit_lens(vlm: HFVisionLanguageAdapter) -> None:
    readout = readout_from_adapter(vlm, WORDS)
    layers = list(range(vlm.info.num_layers))
    states = vlm.last_token_states(REQUESTS, layers)
    similarities = layer_similarities(states, readout)
    assert similarities.shape == (len(REQUESTS), len(layers))
    for i, request in enumerate(REQUESTS):
        expected = reference_similarities(vlm, request, readout.token_ids)
        np.testing.assert_allclose(similarities[i], expected, rtol=1e-4, atol=1e-6)
    # Without the norm the numbers differ far beyond that tolerance: the check above really covers it.
    plain = replace(readout, norm=nn.Identity())
    assert np.abs(layer_similarities(states, plain) - similarities).max() > 1e-4


@pytest.mark.slow
def test_embedded_readout_matches_its_logits(embedded_folder: Path, tmp_path: Path) -> None:
    from pipeline.models.embedded import EmbeddedAdapter

    adapter = EmbeddedAdapter.from_folder(embedded_folder, device="cpu", ocr_cache=tmp_path)
    readout = readout_from_adapter(adapter, WORDS)
    assert readout.unembedding.shape == (len(adapter.tokenizer), adapter.info.hidden_size)
    assert readout.norm is not adapter.model.model.norm
    last = adapter.info.num_layers - 1
    states = adapter.last_token_states(REQUESTS, [last])
    for i, request in enumerate(REQUESTS):
        batch = adapter.encode([request])
        with torch.inference_mode():
            logits = adapter.model(**batch).logits[0, -1]
        expected = torch.nn.functional.cosine_similarity(logits, multi_hot(len(logits), readout.token_ids), dim=0)
        np.testing.assert_allclose(layer_similarities(states[i : i + 1], readout)[0, 0], float(expected), rtol=1e-4)


def test_model_without_a_final_norm_is_named() -> None:
    class HeadOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = nn.Linear(4, 10, bias=False)

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

    adapter = SimpleNamespace(model=HeadOnly(), tokenizer=None, info=SimpleNamespace(hidden_size=4))
    with pytest.raises(ValueError, match="HeadOnly: cannot find the text decoder's final norm"):
        readout_from_adapter(adapter, WORDS)


# --- layer_similarities and refusal_scores ---------------------------------------------------------


def test_chunk_size_does_not_change_the_result(vlm: HFVisionLanguageAdapter) -> None:
    readout = readout_from_adapter(vlm, WORDS)
    states = vlm.last_token_states(REQUESTS * 3, list(range(vlm.info.num_layers)))
    whole = layer_similarities(states, readout, chunk_rows=10_000)
    for chunk_rows in (1, 3, 5, 7):
        # Equal up to float32 rounding: BLAS picks kernels by matrix shape, so bits may differ.
        chunked = layer_similarities(states, readout, chunk_rows=chunk_rows)
        np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-8)


def test_state_along_refusal_rows_scores_higher_than_random_states(vlm: HFVisionLanguageAdapter) -> None:
    readout = readout_from_adapter(vlm, WORDS)
    # Undo the norm's weight so that after the norm the state points along the refusal tokens' rows.
    along = readout.unembedding[list(readout.token_ids)].sum(dim=0) / readout.norm.weight
    random = torch.randn(100, vlm.info.hidden_size, generator=torch.Generator().manual_seed(2))
    refusing = layer_similarities(along[None, None], readout)[0, 0]
    others = layer_similarities(random[:, None], readout)[:, 0]
    assert refusing > 0
    assert refusing > others.max()


def test_similarities_are_cosines_with_the_multi_hot_vector() -> None:
    readout = synthetic_readout()
    states = np.random.default_rng(0).normal(size=(4, 2, 8)).astype(np.float16)
    logits = readout.norm(torch.as_tensor(states, dtype=torch.float32)) @ readout.unembedding.T
    expected = torch.nn.functional.cosine_similarity(logits, multi_hot(40, readout.token_ids), dim=-1)
    np.testing.assert_allclose(layer_similarities(states, readout, chunk_rows=3), expected.detach().numpy(), rtol=1e-5)


def test_bad_states_are_refused() -> None:
    readout = synthetic_readout()
    with pytest.raises(ValueError, match=r"\(n, layers, 8\)"):
        layer_similarities(np.zeros((2, 8)), readout)
    states = np.ones((3, 2, 8))
    states[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match="row 2, layer position 1"):
        layer_similarities(states, readout)


def test_token_ids_outside_the_vocabulary_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[40\]"):
        synthetic_readout(token_ids=(3, 40))


def test_refusal_scores_sum_the_chosen_layers() -> None:
    similarities = np.array([[0.1, 0.2, 0.4], [0.0, -0.1, 0.3]])
    np.testing.assert_allclose(refusal_scores(similarities, [2, 5, 9], []), [0.7, 0.2])
    np.testing.assert_allclose(refusal_scores(similarities, [2, 5, 9], [9, 5]), [0.6, 0.2])
    with pytest.raises(ValueError, match=r"\[7\] are not among the stored layers \[2, 5, 9\]"):
        refusal_scores(similarities, [2, 5, 9], [5, 7])


# --- store_similarities --------------------------------------------------------------------------


def test_store_similarities_read_one_framing_shard_by_shard(tmp_path: Path) -> None:
    provenance = store_provenance()  # layers (1, 3), hidden size 8
    states = np.random.default_rng(0).normal(size=(7, 3, 2, 8)).astype(np.float16)
    store = ActivationStore.create(tmp_path / "s.zarr", list(range(7)), provenance, shard_rows=4)
    store.write_block(0, states[:4])
    readout = synthetic_readout()
    with pytest.raises(ValueError, match="NaN states"):
        store_similarities(store, readout)
    store.write_block(4, states[4:])
    for framing in ("plain", "benign"):
        expected = layer_similarities(states[:, provenance.variants.index(framing)], readout)
        np.testing.assert_allclose(store_similarities(store, readout, framing), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown framing 'other'"):
        store_similarities(store, readout, "other")
    plain = layer_similarities(states[:, provenance.variants.index("plain")], readout)
    np.testing.assert_allclose(store_refusal_scores(store, readout, [3]), plain[:, 1], rtol=1e-6)
    np.testing.assert_allclose(store_refusal_scores(store, readout, []), plain.sum(axis=1), rtol=1e-6)
