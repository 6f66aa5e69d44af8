"""Which tokens of a prompt are the request's own: what a mean over the request's tokens averages.

A prompt is the chat template around the user content; the content holds the request and, around
it, words that are not the user's (a framing, the embedded model's image delimiters). The
caller names the user's characters of the content as spans; a token is the request's when its
characters overlap one of them (a token that also carries a neighbouring space or framing
character counts). Template tokens, added tokens with empty offsets and a VLM's image tokens
never do.

The prompt's ids are built exactly as :mod:`pipeline.models.literal` builds them (the ordinary
path, or the spare-token splice for content with added-token strings), with the tokenizer's
character offsets alongside, so the mask lines up with the ids the model runs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from pipeline.models.base import Span
from pipeline.models.literal import (
    CONTENT_MARK,
    contains_added_token,
    spare_position,
    spare_token,
    split_prompt,
)


def spans_in_prompt(render: Callable[[str], str], content: str, spans: Sequence[Span]) -> tuple[str, list[Span]]:
    """The prompt ``render(content)`` and ``spans`` (characters of ``content``) as characters of that prompt.

    A template that trims the content is followed; one that rewrites it otherwise is refused,
    since the request's characters could then not be found.
    """
    marked = render(CONTENT_MARK)
    if marked.count(CONTENT_MARK) != 1:
        raise ValueError("the chat template does not place the user content exactly once")
    before, after = marked.split(CONTENT_MARK)
    prompt = render(content)
    if not (prompt.startswith(before) and prompt.endswith(after)) or len(prompt) < len(before) + len(after):
        raise ValueError("the chat template renders the text around the user content differently per request")
    rendered = prompt[len(before) : len(prompt) - len(after)]
    lead = content.find(rendered)
    if lead < 0:
        raise ValueError(
            "the chat template rewrites the user content, so the request's own tokens cannot be located"
            " for mean pooling"
        )
    placed: list[Span] = []
    for start, stop in spans:
        start, stop = max(start - lead, 0), min(stop - lead, len(rendered))
        if start < stop:
            placed.append((len(before) + start, len(before) + stop))
    return prompt, placed


def overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
    """1 for each token whose characters ``[start, stop)`` overlap one of ``spans``; tokens without characters: 0."""
    return [int(stop > start and any(start < b and stop > a for a, b in spans)) for start, stop in offsets]


def _offsets(encoded: Any) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]


def ids_and_request_mask(
    tokenizer: Any,
    render: Callable[[str], str],
    content: str,
    spans: Sequence[Span],
    added_tokens: Sequence[str],
    excluded: Collection[int] = (),
) -> tuple[list[int], list[int]]:
    """The ids of ``render(content)`` as the adapters build them, and a 0/1 mask of the request's tokens.

    ``spans``: the user's characters of ``content``. ``added_tokens``: the tokenizer's added-token
    strings; content holding one goes through the spare-token splice (``excluded`` ids are never
    the spare), as in :func:`pipeline.models.literal.splice`.
    """
    prompt, placed = spans_in_prompt(render, content, spans)
    if not contains_added_token(content, added_tokens):
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), overlap_mask(_offsets(encoded), placed)
    parts = split_prompt(render, content)
    spare, spare_id = spare_token(tokenizer, parts.prefix + parts.suffix, excluded)
    around = list(tokenizer(parts.prefix + spare + parts.suffix, add_special_tokens=False)["input_ids"])
    at = spare_position(around, spare_id)
    encoded = tokenizer(parts.content, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    # The content's offsets count from its own start, which sits right after the kept prefix.
    shifted = [(start + len(parts.prefix), stop + len(parts.prefix)) for start, stop in _offsets(encoded)]
    content_ids = list(encoded["input_ids"])
    ids = [*around[:at], *content_ids, *around[at + 1 :]]
    mask = [0] * at + overlap_mask(shifted, placed) + [0] * (len(around) - at - 1)
    return ids, mask


def aligned_mask(final_ids: Sequence[int], text_ids: Sequence[int], text_mask: Sequence[int]) -> list[int]:
    """``text_mask`` (over ``text_ids``, the prompt before a processor expands its images) moved onto ``final_ids``.

    The request's tokens come after every image token, so from the first of them to the end the
    two id lists are equal; that is checked, and a template that puts the image after the text is
    refused rather than averaged over the wrong tokens.
    """
    if 1 not in text_mask:
        return [0] * len(final_ids)
    tail = len(text_ids) - text_mask.index(1)
    if tail > len(final_ids) or list(final_ids[len(final_ids) - tail :]) != list(text_ids[len(text_ids) - tail :]):
        raise ValueError(
            "the processor's tokens after the request's first token differ from the tokenizer's (an image after "
            "the text?): the request's own tokens cannot be located for mean pooling"
        )
    return [0] * (len(final_ids) - tail) + list(text_mask[len(text_mask) - tail :])
