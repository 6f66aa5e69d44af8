"""Cross-request prefix reuse (pipeline.models.prefix_cache): the same states and answers as without it.

Every tiny family and the embedded model, with and without images, in batches that mix short and
long requests, under last-token and mean reads; sessions' states and answers too; then the cache's
own bookkeeping (what it keys on, its bound, its report). The real default model is checked in a
slow test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from pipeline.config import ContrastivePrompts
from pipeline.models.base import Request, RequestGroup
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.hf_vlm import HFVisionLanguageAdapter
from pipeline.models.ocr import OCRLine
from pipeline.models.prefix_cache import (
    MIN_PREFIX_TOKENS,
    CachedPrefix,
    PrefixCache,
    common_start,
    prefix_cache,
    set_prefix_reuse,
    template_length,
)
from pipeline.models.session import PrefixSession
from pipeline.testing.tiny_embedded import tiny_embedded, tiny_llama

LAYERS = [0, 1]
ATOL = 1e-4
SHORT = "How do I kill a Python process?"
LONG = (
    "Write a detailed, friendly guide for a new volunteer at the town library: how to shelve returned books, "
    "how to help visitors find a title in the catalogue, and what to do when the printer jams again."
)
POSITIONS = ("before", "after")


@pytest.fixture(scope="module")
def embedded(gguf_tokenizer: PreTrainedTokenizerBase) -> EmbeddedAdapter:
    line = OCRLine(text="Steps to make a pipe bomb", box=[[0.0, 0.0], [9.0, 0.0], [9.0, 9.0], [0.0, 9.0]], score=0.99)
    return tiny_embedded(tiny_llama(gguf_tokenizer, seed=1), gguf_tokenizer, (line,))


# Groups of every framing, as extraction and LSI read them, and of one (the plain probe reads the plain prompt).
FRAMINGS = (("benign", "malicious", "plain"), ("plain",))


def groups_for(
    position: str, picture: Path, with_image: bool, names: tuple[str, ...] = FRAMINGS[0]
) -> list[RequestGroup]:
    prompts = ContrastivePrompts(position=position)
    image = picture if with_image else None
    out = []
    for question, picture_of in ((SHORT, image), (LONG, None), ("hi", image), (LONG + " Thanks!", image)):
        variants = prompts.variants(question)
        spans = tuple(prompts.request_span(name, question) for name in names)
        out.append(RequestGroup(tuple(variants[name] for name in names), picture_of, spans=spans))
    return out


def states_both_ways(
    adapter: object, groups: list[RequestGroup], reads: tuple[str, ...], expect_reuse: bool = True
) -> None:
    """Grouped states with reuse (cold: built now; warm: found) equal those without."""
    set_prefix_reuse(adapter, False)
    expected = adapter.group_states(groups, LAYERS, reads)  # type: ignore[attr-defined]
    cache = set_prefix_reuse(adapter, True)
    assert cache is not None
    cold = adapter.group_states(groups, LAYERS, reads)  # type: ignore[attr-defined]
    warm = adapter.group_states(groups, LAYERS, reads)  # type: ignore[attr-defined]
    torch.testing.assert_close(cold, expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(warm, expected, atol=ATOL, rtol=ATOL)
    stats = cache.stats()
    if expect_reuse:
        assert stats.entries >= 1 and stats.hits >= 1, f"the batches never reused a prefix: {stats}"


@pytest.mark.parametrize("names", FRAMINGS, ids=len)
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("with_image", [True, False])
def test_every_family_states_equal_without_reuse(
    family_adapter: HFVisionLanguageAdapter, picture: Path, position: str, with_image: bool, names: tuple[str, ...]
) -> None:
    groups = groups_for(position, picture, with_image, names)
    # One prompt per request with images: a forward behind a cached start takes no image inputs.
    reuse = not (with_image and len(names) == 1)
    states_both_ways(family_adapter, groups, ("last",), reuse)
    states_both_ways(family_adapter, groups, ("last", "mean"), reuse)


def test_one_prompt_with_pixels_is_encoded_once_under_reuse(
    family_adapter: HFVisionLanguageAdapter, picture: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A forward behind a cached start takes no pixel values, so such a batch runs the plain forward;
    # that is decided before encoding, so the images are processed once, not twice.
    groups = groups_for("after", picture, True, ("plain",))
    set_prefix_reuse(family_adapter, True)
    calls = []
    encode = family_adapter.encode

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return encode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(family_adapter, "encode", counted)
    family_adapter.group_states(groups, LAYERS)
    assert len(calls) == 1


@pytest.mark.parametrize("names", FRAMINGS, ids=len)
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("with_image", [True, False])
def test_embedded_states_equal_without_reuse(
    embedded: EmbeddedAdapter, picture: Path, position: str, with_image: bool, names: tuple[str, ...]
) -> None:
    groups = groups_for(position, picture, with_image, names)
    states_both_ways(embedded, groups, ("last",))  # its images are OCR text: reused like any other
    states_both_ways(embedded, groups, ("last", "mean"))


def sessions_both_ways(adapter: object, picture: Path) -> None:
    """Sessions' states and answers with reuse equal those without, token for token."""
    for position in POSITIONS:
        prompts = ContrastivePrompts(position=position)
        for question, image in ((SHORT, picture), (LONG, None), (SHORT, None)):
            variants = prompts.variants(question)
            texts = [variants["benign"], variants["malicious"], variants["plain"]]
            spans = [prompts.request_span("benign", question), prompts.request_span("malicious", question), None]
            runs = []
            for run in ("without", "cold", "warm"):
                if run != "warm":  # without: reuse off; cold: a fresh, empty cache, built by this session
                    set_prefix_reuse(adapter, run == "cold")
                session = PrefixSession(adapter, texts, image, spans=spans, mean_layers=LAYERS)  # type: ignore[arg-type]
                states = session.states(LAYERS, ("last", "mean"))
                runs.append((states, session.answer(8), session.reused_tokens))
            (base, answer, reused), *others = runs
            assert reused == 0
            for states, other_answer, _ in others:
                torch.testing.assert_close(states, base, atol=ATOL, rtol=ATOL)
                assert other_answer == answer
            assert runs[-1][2] >= MIN_PREFIX_TOKENS, "the warm session did not start from the cached prefix"


def test_every_family_session_equals_without_reuse(family_adapter: HFVisionLanguageAdapter, picture: Path) -> None:
    sessions_both_ways(family_adapter, picture)


def test_embedded_session_equals_without_reuse(embedded: EmbeddedAdapter, picture: Path) -> None:
    sessions_both_ways(embedded, picture)


def test_entries_are_keyed_by_tokens_and_never_cover_the_request(embedded: EmbeddedAdapter) -> None:
    cache = set_prefix_reuse(embedded, True)
    assert cache is not None and prefix_cache(embedded) is cache
    for position in POSITIONS:
        prompts = ContrastivePrompts(position=position)
        variants = prompts.variants(SHORT)
        embedded.group_states([RequestGroup((variants["benign"], variants["malicious"]))], LAYERS)
    stats = cache.stats()
    assert stats.builds >= 1 and stats.bytes > 0
    for position in POSITIONS:
        prompts = ContrastivePrompts(position=position)
        for name in ("benign", "malicious"):
            text = prompts.variants(SHORT)[name]
            batch = embedded.encode([Request(text, span=prompts.request_span(name, SHORT))], request_masks=True)
            ids, mask = batch["input_ids"][0].tolist(), batch["request_mask"][0].tolist()
            starts = [tokens for tokens in cache._entries if tuple(ids[: len(tokens)]) == tokens]
            # Each framing starts from an entry, and no entry reaches into the request's own tokens.
            assert starts and all(len(tokens) <= mask.index(1) for tokens in starts)
    # Another system prompt is other tokens: a new entry, the old ones untouched.
    before = set(cache._entries)
    other = ContrastivePrompts(benign="As a careful librarian, answer: {q}", malicious="As a thief, answer: {q}")
    variants = other.variants(SHORT)
    embedded.group_states([RequestGroup((variants["benign"], variants["malicious"]))], LAYERS)
    assert before <= set(cache._entries)
    set_prefix_reuse(embedded, False)
    assert prefix_cache(embedded) is None
    set_prefix_reuse(embedded, True)


def entry(tokens: tuple[int, ...]) -> CachedPrefix:
    blank = torch.zeros(1, 1, len(tokens), 2)
    return CachedPrefix(tokens, ((blank, blank),))


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = PrefixCache(max_tokens=12)
    first, second, third = entry(tuple(range(5))), entry(tuple(range(10, 15))), entry(tuple(range(20, 25)))
    assert cache.add(first) and cache.add(second)
    assert cache.get([0, 1, 2, 3, 4]) is first  # first is now the most recently used
    assert cache.add(third)
    stats = cache.stats()
    assert (stats.entries, stats.tokens, stats.evictions, stats.hits) == (2, 10, 1, 1)
    assert cache.get(range(10, 15)) is None and cache.get(range(5)) is first
    assert not cache.add(entry(tuple(range(13))))  # longer than the whole bound: never kept
    assert stats.bytes == 2 * 2 * 5 * 2 * 4
    with pytest.raises(ValueError, match="max_tokens must be at least"):
        PrefixCache(max_tokens=1)


def test_an_entry_is_found_by_its_exact_tokens_only() -> None:
    cache = PrefixCache()
    short = entry((1, 2, 3, 4))
    cache.add(short)
    assert cache.get((1, 2, 3, 4)) is short
    assert cache.get((1, 2, 3)) is None and cache.get((1, 2, 3, 4, 5)) is None


def test_a_batch_uses_the_same_start_whatever_ran_before(embedded: EmbeddedAdapter, picture: Path) -> None:
    """The start depends on the batch alone: a long-lived process and a fresh one give the same states, bit for bit."""
    groups = groups_for("after", picture, with_image=True)
    set_prefix_reuse(embedded, True)
    fresh = embedded.group_states(groups, LAYERS)
    set_prefix_reuse(embedded, True)
    for other in (groups_for("before", picture, with_image=False), groups[1:2], groups[2:3]):
        embedded.group_states(other, LAYERS)  # other batches build other starts first
    assert torch.equal(embedded.group_states(groups, LAYERS), fresh)


def test_template_length_and_common_start() -> None:
    assert template_length([1, 2, 3, 4, 5], [0, 0, 0, 1, 1], frozenset()) == 3
    assert template_length([1, 2, 7, 4, 5], [0, 0, 0, 1, 1], frozenset({7})) == 2
    assert template_length([1, 2, 3], None, frozenset()) == 3
    assert common_start([[1, 2, 3], [1, 2, 4], [1, 2]]) == (1, 2)
    assert common_start([[1], [2]]) == ()


@pytest.mark.slow
def test_default_model_states_and_answers_equal_without_reuse(embedded_folder: Path, picture: Path) -> None:
    adapter = EmbeddedAdapter.from_folder(embedded_folder, device="cpu")
    for position in POSITIONS:
        for names in FRAMINGS:
            states_both_ways(adapter, groups_for(position, picture, False, names), ("last", "mean"))
    sessions_both_ways(adapter, picture)
