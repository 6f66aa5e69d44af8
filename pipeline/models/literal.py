"""User text reaches the model as text: control tokens typed into a request are never interpreted.

A tokenizer turns the strings of its added tokens (``<|im_end|>``, ``<|endoftext|>``, ``<image>``,
...) into their control ids wherever they occur, so a request that contains ``<|im_end|>`` could
close its own turn and forge an assistant or system turn. Every adapter therefore tokenises the
user turn's content (the request, its framing, text found in an image) with
``split_special_tokens=True``, and the chat template around it as usual.

How: the template is rendered once with a marker in place of the content, to learn what comes
before and after it; the prompt given to the tokenizer (or processor, which expands image tokens)
has one spare special token where the content goes, and that one id is replaced by the content's
ids tokenised as plain text. Requests without any added-token string take the ordinary path, so
their ids are exactly what the chat template and tokenizer give.

The same module bounds a prompt's length: :class:`RequestTooLong` when the user turn, as the model
reads it, exceeds ``limits.max_request_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import LSIGuardError

# Stands in for the user content while the chat template is rendered: private-use characters
# that no template rewrites and no request is expected to contain.
CONTENT_MARK = "\ue000lsi-guard-content\ue001"


class RequestTooLong(LSIGuardError, ValueError):
    """A request whose user turn has more tokens than ``limits.max_request_tokens`` allows."""


def added_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """Every string this tokenizer maps to an added (control or extra) token, longest first."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings = {str(token.content) for token in decoder.values() if str(token.content)}
    return tuple(sorted(strings, key=len, reverse=True))


def contains_added_token(text: str, strings: Sequence[str]) -> bool:
    """Whether ``text`` holds any of the added-token ``strings``."""
    return any(s in text for s in strings)


@dataclass(frozen=True)
class PromptParts:
    """A rendered prompt cut around its user content: ``prefix + content + suffix`` is the prompt."""

    prefix: str
    content: str
    suffix: str


def split_prompt(render: Callable[[str], str], content: str) -> PromptParts:
    """Where ``content`` sits in ``render(content)``, found by rendering a marker in its place.

    A template may rewrite the content (trim it, say): what lies between the marker's prefix and
    suffix in the real rendering is the content as the template wrote it.
    """
    marked = render(CONTENT_MARK)
    if marked.count(CONTENT_MARK) != 1:
        raise ValueError("the chat template does not place the user content exactly once")
    prefix, suffix = marked.split(CONTENT_MARK)
    real = render(content)
    if not (real.startswith(prefix) and real.endswith(suffix)) or len(real) < len(prefix) + len(suffix):
        raise ValueError("the chat template renders the text around the user content differently per request")
    # Spaces before the content ("USER: {text}") belong to its first word in BPE and SentencePiece
    # vocabularies (" Tell" is one token): they go with the content, so the cut changes no token.
    kept = prefix.rstrip(" ")
    return PromptParts(kept, prefix[len(kept) :] + real[len(prefix) : len(real) - len(suffix)], suffix)


def spare_token(tokenizer: Any, around: str, excluded: Collection[int]) -> tuple[str, int]:
    """A special token absent from ``around`` and not in ``excluded``, to hold the content's place.

    Preferred in this order: the unknown, beginning-of-sequence and end-of-sequence tokens, then
    any other added token; never the pad token (padding is made of it) or an image token.
    """
    excluded = set(excluded)
    if tokenizer.pad_token_id is not None:
        excluded.add(int(tokenizer.pad_token_id))
    named = [getattr(tokenizer, f"{name}_token", None) for name in ("unk", "bos", "eos")]
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    others = [str(token.content) for _, token in sorted(decoder.items())]
    for candidate in [*named, *others]:
        if not candidate or candidate in around:
            continue
        token_id = tokenizer.convert_tokens_to_ids(candidate)
        if isinstance(token_id, int) and token_id not in excluded:
            return candidate, token_id
    raise ValueError("the tokenizer has no spare special token to hold the user content's place")


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` tokenised with every added-token string read as ordinary characters."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def spare_position(ids: Sequence[int], spare_id: int) -> int:
    """Where the single ``spare_id`` sits in ``ids``."""
    positions = [i for i, token in enumerate(ids) if token == spare_id]
    if len(positions) != 1:
        raise ValueError(f"expected the spare token {spare_id} exactly once in the prompt, found {len(positions)}")
    return positions[0]


def splice(ids: Sequence[int], spare_id: int, content_ids: Sequence[int]) -> list[int]:
    """``ids`` with its single ``spare_id`` replaced by ``content_ids``."""
    at = spare_position(ids, spare_id)
    return [*ids[:at], *content_ids, *ids[at + 1 :]]


def check_length(content_tokens: int, limit: int | None, what: str) -> None:
    """Refuse a user turn longer than ``limit`` tokens (no limit when ``None``)."""
    if limit is not None and content_tokens > limit:
        raise RequestTooLong(
            f"{what} is {content_tokens} tokens long, over limits.max_request_tokens={limit}; "
            "shorten it, or raise the limit in params.yaml (memory and time grow with it)"
        )


def splice_batch(batch: Any, replacements: dict[int, tuple[int, Sequence[int]]], pad_id: int) -> Any:
    """A left-padded tokenizer or processor batch with some rows' spare token replaced by content ids.

    ``replacements`` maps a row to ``(spare_id, content_ids)``. Every other per-token tensor of the
    batch (same shape as ``input_ids``: token type ids and the like) gets zeros for the new tokens,
    the attention mask ones; rows are padded on the left again to the new longest row.
    """
    import torch  # torch is heavy; only batches with spliced rows need it here

    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    per_token = [key for key, value in batch.items() if torch.is_tensor(value) and value.shape == input_ids.shape]
    rows: dict[str, list[list[int]]] = {key: [] for key in per_token}
    for i in range(input_ids.shape[0]):
        real = mask[i].bool()
        replacement = replacements.get(i)
        at = spare_position(input_ids[i][real].tolist(), replacement[0]) if replacement else 0
        for key in per_token:
            values = batch[key][i][real].tolist()
            if replacement:
                content_ids = list(replacement[1])
                if key == "input_ids":
                    fill = content_ids
                else:
                    fill = [1 if key == "attention_mask" else 0] * len(content_ids)
                values = [*values[:at], *fill, *values[at + 1 :]]
            rows[key].append(values)
    width = max(len(row) for row in rows["input_ids"])
    for key in per_token:
        pad = pad_id if key == "input_ids" else 0
        padded = [[pad] * (width - len(row)) + row for row in rows[key]]
        batch[key] = torch.tensor(padded, dtype=batch[key].dtype, device=batch[key].device)
    return batch
