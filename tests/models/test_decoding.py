"""Decoding settings: validation, generate keyword arguments, and seeded sampling on real (tiny) adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from pipeline.config import GREEDY, Decoding
from pipeline.models.base import Request
from pipeline.models.decoding import generate_kwargs
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.hf_vlm import HFVisionLanguageAdapter
from pipeline.models.ocr import OCRLine
from pipeline.testing.tiny_embedded import tiny_embedded, tiny_llama

REQUESTS = [Request("Tell me a story about a cat."), Request("What is the capital of France?")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature: expected a finite number > 0"),
        ({"top_p": 0.0}, "top_p: expected a number in"),
        ({"top_k": -1}, "top_k: expected a whole number >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty: expected a finite number > 0"),
        ({"do_sample": "yes"}, "do_sample: expected true or false"),
    ],
)
def test_impossible_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Decoding(**kwargs)


def test_generate_kwargs_leave_sampling_options_unset_when_greedy() -> None:
    assert GREEDY.greedy
    assert generate_kwargs(GREEDY) == {
        "do_sample": False,
        "repetition_penalty": 1.0,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    sampled = Decoding(do_sample=True, temperature=0.7, top_p=0.9, top_k=0)
    assert generate_kwargs(sampled) == {
        "do_sample": True,
        "repetition_penalty": 1.0,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": None,
    }
    assert not sampled.greedy and not Decoding(repetition_penalty=1.2).greedy


@pytest.fixture(scope="module")
def embedded(gguf_tokenizer: PreTrainedTokenizerBase) -> EmbeddedAdapter:
    return tiny_embedded(
        tiny_llama(gguf_tokenizer, seed=2),
        gguf_tokenizer,
        (OCRLine(text="a sign", box=[[0.0, 0.0], [9.0, 0.0], [9.0, 9.0], [0.0, 9.0]], score=0.9),),
    )


def test_sampling_is_seeded_and_leaves_the_global_random_state_alone(embedded: EmbeddedAdapter) -> None:
    sampled = Decoding(do_sample=True, temperature=1.5, seed=11)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = embedded.generate(REQUESTS, 8, sampled)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the sampling ran inside a forked random state
    assert embedded.generate(REQUESTS, 8, sampled) == first
    others = [embedded.generate(REQUESTS, 8, Decoding(do_sample=True, temperature=1.5, seed=s)) for s in (1, 2, 3)]
    assert any(other != first for other in others)


def test_greedy_is_the_default_and_ignores_the_seed(embedded: EmbeddedAdapter) -> None:
    assert embedded.generate(REQUESTS, 6) == embedded.generate(REQUESTS, 6, Decoding(seed=99))


def test_a_batch_answers_as_each_request_alone(embedded: EmbeddedAdapter) -> None:
    """Left padding: the batch's answers equal one-at-a-time answers however the tokenizer was built."""
    embedded.tokenizer.padding_side = "right"
    try:
        batched = embedded.generate(REQUESTS, 6)
    finally:
        embedded.tokenizer.padding_side = "left"
    assert batched == [embedded.generate([request], 6)[0] for request in REQUESTS]


def test_hf_adapter_takes_the_same_settings(tiny_llava_folder: Path) -> None:
    adapter = HFVisionLanguageAdapter.from_folder(tiny_llava_folder, dtype="float32", device="cpu")
    sampled = Decoding(do_sample=True, temperature=1.5, top_k=20, seed=4)
    first = adapter.generate(REQUESTS, 5, sampled)
    assert adapter.generate(REQUESTS, 5, sampled) == first
    assert adapter.generate(REQUESTS, 5) == adapter.generate(REQUESTS, 5, GREEDY)
