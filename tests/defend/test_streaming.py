"""``Guard.generate_stream``: the decision at once, the answer token by token, its finish reason and usage.

The guard is the web demo's tiny random Llama behind a steep random probe (``tiny_guard``), its
tau set between its scores of two requests so one is answered and the other refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from transformers import PreTrainedTokenizerBase

from lsi_guard_app.web.app import BENIGN_EXAMPLE, HARMFUL_EXAMPLE
from pipeline.defend.guard import Guard
from pipeline.defend.usage import prompt_token_count, text_token_count
from pipeline.models.base import Request
from tests.app.test_web import tiny_guard

TOKENS = 12


@dataclass(frozen=True)
class Split:
    guard: Guard
    answered: str
    refused: str


@pytest.fixture(scope="module")
def split(gguf_tokenizer: PreTrainedTokenizerBase) -> Split:
    scout = tiny_guard(gguf_tokenizer, tau=0.5)
    scores = {text: scout.check(None, text).score for text in (HARMFUL_EXAMPLE, BENIGN_EXAMPLE)}
    high, low = sorted(scores, key=lambda text: scores[text], reverse=True)
    return Split(tiny_guard(gguf_tokenizer, tau=(scores[high] + scores[low]) / 2), low, high)


def test_the_pieces_come_one_token_at_a_time_and_join_to_the_answer(split: Split) -> None:
    expected = split.guard.generate(None, split.answered, TOKENS)
    stream = split.guard.generate_stream(None, split.answered, TOKENS)
    assert stream.decision == expected.decision and stream.decision.action == "answer"
    pieces = list(stream)
    assert len(pieces) > 1, "a token-by-token answer comes in more than one piece"
    assert "".join(pieces).strip() == expected.response
    result = stream.result()
    assert result.response == expected.response
    assert result.finish_reason == expected.finish_reason
    assert result.usage == expected.usage


def test_an_answer_cut_by_max_tokens_ends_with_length_and_counts_its_tokens(split: Split) -> None:
    guard = split.guard
    result = guard.generate(None, split.answered, TOKENS)
    prompt = prompt_token_count(guard.adapter, Request(text=split.answered))
    assert result.usage is not None and result.usage.prompt_tokens == prompt
    # The random model never picks an end-of-answer token in its first 12 (the next test makes it).
    assert result.finish_reason == "length" and result.usage.completion_tokens == TOKENS
    assert result.usage.total_tokens == prompt + result.usage.completion_tokens


def test_an_end_of_answer_token_ends_with_stop(split: Split) -> None:
    guard = split.guard
    stream = guard.generate_stream(None, split.answered, TOKENS)
    list(stream)
    session = stream._session
    assert session is not None and len(session.answer_token_ids) >= 3
    config = guard.adapter.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = session.answer_token_ids[2]  # the answer's third token now ends it
    try:
        result = guard.generate(None, split.answered, TOKENS)
    finally:
        config.eos_token_id = saved
    assert result.finish_reason == "stop"
    assert result.usage is not None and result.usage.completion_tokens == 2


def test_cancelling_stops_before_the_next_token(split: Split) -> None:
    seen: list[str] = []
    stream = split.guard.generate_stream(None, split.answered, TOKENS, cancelled=lambda: bool(seen))
    for piece in stream:
        seen.append(piece)
    result = stream.result()
    assert result.finish_reason == "cancelled"
    assert result.usage is not None and result.usage.completion_tokens < TOKENS
    assert len(seen) == 1


def test_a_refusal_is_one_piece_counted_under_the_models_tokenizer(split: Split) -> None:
    guard = split.guard
    stream = guard.generate_stream(None, split.refused, TOKENS)
    assert stream.decision.refused
    assert list(stream) == [guard.config.refusal_message]
    result = stream.result()
    assert result.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.completion_tokens == text_token_count(guard.adapter, guard.config.refusal_message)
    assert result.usage.prompt_tokens == prompt_token_count(guard.adapter, Request(text=split.refused))


def test_the_result_waits_for_the_pieces(split: Split) -> None:
    stream = split.guard.generate_stream(None, split.answered, TOKENS)
    with pytest.raises(RuntimeError, match="have not all been read"):
        stream.result()
