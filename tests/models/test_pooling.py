"""Mean pooling over the request's own tokens, against a plain unbatched forward, for every adapter path.

The reference finds the request's tokens its own way (the request's standalone tokens as a run
of the prompt's ids) and averages ``hidden_states[k + 1]`` over them, one prompt per forward.
The adapters find them by character offsets and read them through batched, left-padded,
prefix-sharing forwards; both must agree within ``ATOL``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from pipeline.config import ContrastivePrompts
from pipeline.detect.features import variant_groups
from pipeline.models.base import Request
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.forward import image_inputs_of
from pipeline.models.hf_vlm import HFVisionLanguageAdapter
from pipeline.models.literal import plain_ids
from pipeline.models.ocr import OCRLine
from pipeline.models.request_tokens import aligned_mask, overlap_mask, spans_in_prompt
from pipeline.models.session import PrefixSession
from pipeline.testing.tiny_embedded import tiny_embedded, tiny_llama

ATOL = 1e-5
LAYERS = [0, 1]  # the reference cannot read the last block (hidden_states[-1] carries the final norm)
OCR_TEXT = "Steps to bake a lemon cake"
# Mixed lengths; one starts like the framing templates (its plain prompt then shares request tokens
# with the framed prompts' framing tokens); one holds a control-token string (the spliced path).
QUESTIONS = (
    "Tell me about the lighthouse keeper who found a bottle on the beach and what was inside it.",
    "What is shown here?",
    "Assume this is a riddle: why?",
    "Say <|im_end|> twice.",
)


def run_of(ids: Sequence[int], run: Sequence[int]) -> list[int]:
    """Positions of the last occurrence of ``run`` inside ``ids``."""
    for start in range(len(ids) - len(run), -1, -1):
        if list(ids[start : start + len(run)]) == list(run):
            return list(range(start, start + len(run)))
    raise AssertionError(f"tokens {list(run)} are not a run of the prompt's ids")


def part_positions(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], part: str) -> list[int]:
    """Where ``part``'s own tokens (after a space, or at a line start) sit in ``ids``."""
    for candidate in (" " + part, part):
        try:
            return run_of(ids, plain_ids(tokenizer, candidate))
        except AssertionError:
            continue
    raise AssertionError(f"{part!r} is not a run of the prompt's ids")


def reference_mean(adapter: object, request: Request, parts: Sequence[str], layers: Sequence[int]) -> torch.Tensor:
    """One prompt, full depth, ``output_hidden_states=True``: ``(len(layers), hidden)`` averaged over ``parts``."""
    batch = adapter.encode([request])  # type: ignore[attr-defined]
    ids = batch["input_ids"][0].tolist()
    positions = sorted({p for part in parts for p in part_positions(adapter.tokenizer, ids, part)})  # type: ignore[attr-defined]
    network = adapter.model  # type: ignore[attr-defined]
    with torch.inference_mode():
        position_ids = adapter.position_ids(  # type: ignore[attr-defined]
            batch["input_ids"], batch["attention_mask"], image_inputs_of(batch)
        )
        hidden = network(**batch, position_ids=position_ids, output_hidden_states=True, use_cache=False).hidden_states
    return torch.stack([hidden[k + 1][0, positions].float().mean(dim=0) for k in layers]).cpu()


def expected_means(
    adapter: object, prompts: ContrastivePrompts, question: str, image: Path | None, ocr: str | None
) -> torch.Tensor:
    """The reference mean of each framing (store order) of ``question``: ``(3, layers, hidden)``."""
    parts = [question] + ([ocr] if ocr and image is not None else [])
    return torch.stack(
        [reference_mean(adapter, Request(text, image), parts, LAYERS) for text in prompts.variants(question).values()]
    )


@pytest.fixture(scope="module")
def embedded(gguf_tokenizer: PreTrainedTokenizerBase) -> EmbeddedAdapter:
    line = OCRLine(text=OCR_TEXT, box=[[0.0, 0.0], [9.0, 0.0], [9.0, 9.0], [0.0, 9.0]], score=0.99)
    return tiny_embedded(tiny_llama(gguf_tokenizer, seed=1), gguf_tokenizer, (line,))


def requests_for(picture: Path) -> list[Request]:
    return [Request(q, picture if i % 2 else None) for i, q in enumerate(QUESTIONS)]


@pytest.mark.parametrize("position", ["before", "after"])
def test_embedded_means_equal_the_unbatched_reference(embedded: EmbeddedAdapter, picture: Path, position: str) -> None:
    """Image text read by OCR counts as the request's; mixed lengths share one batch and its padding."""
    prompts = ContrastivePrompts(position=position)
    requests = requests_for(picture)
    states = embedded.group_states(variant_groups(requests, prompts), LAYERS, reads=("last", "mean"))
    assert states.shape == (len(requests), 6, len(LAYERS), embedded.info.hidden_size)
    for i, request in enumerate(requests):
        expected = expected_means(embedded, prompts, request.text, request.image, OCR_TEXT)
        torch.testing.assert_close(states[i, 3:], expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("position", ["before", "after"])
def test_every_family_means_equal_the_unbatched_reference(
    family_adapter: HFVisionLanguageAdapter, picture: Path, position: str
) -> None:
    """Image tokens are not the request's: the mean covers the text's tokens only, with and without an image."""
    prompts = ContrastivePrompts(position=position)
    requests = requests_for(picture)[:3]
    states = family_adapter.group_states(variant_groups(requests, prompts), LAYERS, reads=("mean",))
    assert states.shape == (len(requests), 3, len(LAYERS), family_adapter.info.hidden_size)
    for i, request in enumerate(requests):
        expected = expected_means(family_adapter, prompts, request.text, request.image, None)
        torch.testing.assert_close(states[i], expected, rtol=0, atol=ATOL)


def test_hf_request_mask_skips_image_and_template_tokens(
    family_adapter: HFVisionLanguageAdapter, picture: Path
) -> None:
    question = "What is shown here?"
    batch = family_adapter.encode([Request(question, picture), Request(question)], request_masks=True)
    own = len(plain_ids(family_adapter.tokenizer, " " + question))
    for row in range(2):
        mask = batch["request_mask"][row]
        assert int(mask.sum()) in (own, len(plain_ids(family_adapter.tokenizer, question)))
        for token in family_adapter.image_token_ids:
            assert not mask[batch["input_ids"][row] == token].any()
        assert not mask[batch["attention_mask"][row] == 0].any()  # padding is never the request's


def test_mean_reads_leave_last_token_states_unchanged(embedded: EmbeddedAdapter, picture: Path) -> None:
    groups = variant_groups(requests_for(picture), ContrastivePrompts())
    last = embedded.group_states(groups, LAYERS)
    both = embedded.group_states(groups, LAYERS, reads=("last", "mean"))
    torch.testing.assert_close(both[:, :3], last, rtol=0, atol=1e-6)
    mean = embedded.group_states(groups, LAYERS, reads=("mean",))
    torch.testing.assert_close(both[:, 3:], mean, rtol=0, atol=1e-6)


def test_single_prompt_groups_and_flat_fallback_give_the_same_means(embedded: EmbeddedAdapter, picture: Path) -> None:
    prompts = ContrastivePrompts()
    groups = variant_groups(requests_for(picture), prompts)
    grouped = embedded.group_states(groups, LAYERS, reads=("mean",))
    singles = variant_groups(requests_for(picture), prompts, variants=("benign",))
    one = embedded.group_states(singles, LAYERS, reads=("mean",))  # group size 1: the plain batched forward
    torch.testing.assert_close(one[:, 0], grouped[:, 0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("with_image", [True, False])
def test_session_means_equal_the_batched_ones(embedded: EmbeddedAdapter, picture: Path, with_image: bool) -> None:
    prompts = ContrastivePrompts()
    image = picture if with_image else None
    for question in QUESTIONS:
        texts = prompts.variants(question)
        framings = ("benign", "malicious")
        session = PrefixSession(
            embedded,
            [texts[v] for v in framings] + [texts["plain"]],
            image,
            spans=[prompts.request_span(v, question) for v in framings] + [None],
            mean_layers=LAYERS,
        )
        states = session.states(LAYERS, ("last", "mean"))
        groups = variant_groups([Request(question, image)], prompts, variants=framings)
        expected = embedded.group_states(groups, LAYERS, reads=("last", "mean"))[0]
        torch.testing.assert_close(states, expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(session.states(LAYERS), expected[:2], rtol=0, atol=ATOL)
        with pytest.raises(ValueError, match="mean_layers"):
            session.states([1], ("mean",))


def test_a_prompt_without_request_tokens_is_refused(embedded: EmbeddedAdapter) -> None:
    groups = variant_groups([Request("")], ContrastivePrompts())
    with pytest.raises(ValueError, match="no tokens of the request's own"):
        embedded.group_states(groups, LAYERS, reads=("mean",))
    with pytest.raises(ValueError, match="reads must be distinct"):
        embedded.group_states(groups, LAYERS, reads=("first",))


def test_spans_follow_a_trimming_template_and_refuse_a_rewriting_one() -> None:
    prompt, spans = spans_in_prompt(lambda c: f"<u>{c.strip()}</u>", "  ab cd ", [(2, 4), (5, 7)])
    assert [prompt[a:b] for a, b in spans] == ["ab", "cd"]
    with pytest.raises(ValueError, match="rewrites the user content"):
        spans_in_prompt(lambda c: f"<u>{c.replace('ab', 'xy')}</u>", "ab", [(0, 2)])
    assert overlap_mask([(0, 0), (0, 3), (3, 5), (5, 9)], [(4, 6)]) == [0, 0, 1, 1]


def test_aligned_mask_refuses_tokens_that_differ_after_the_request_starts() -> None:
    assert aligned_mask([9, 9, 9, 1, 2, 3], [5, 1, 2, 3], [0, 1, 1, 0]) == [0, 0, 0, 1, 1, 0]
    assert aligned_mask([9, 1], [1], [0]) == [0, 0]
    with pytest.raises(ValueError, match="cannot be located"):
        aligned_mask([9, 1, 7, 3], [5, 1, 2, 3], [0, 1, 1, 0])
