"""Token counts of one guarded answer, as an OpenAI ``usage`` object reports them.

``prompt_tokens`` counts the answered prompt (the request in the model's chat template, image tokens
included); ``completion_tokens`` counts what the user receives: the tokens the model decoded, or for a
response the guard wrote or ECSO rewrote (a refusal, ECSO's final answer) that text under the model's
tokenizer. The check's framings are not counted: they are the guard's own work, not the client's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.models.base import ModelAdapter, Request

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"


@dataclass(frozen=True)
class TokenUsage:
    """Prompt and completion tokens of one answer (``total_tokens`` is their sum)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


def prompt_token_count(adapter: ModelAdapter, request: Request) -> int | None:
    """Tokens of ``request``'s prompt as the adapter encodes it, or None for an adapter that cannot say."""
    encode = getattr(adapter, "encode", None)
    if encode is None:
        return None
    batch = encode([request])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].shape[-1])


def text_token_count(adapter: ModelAdapter, text: str) -> int | None:
    """Tokens of ``text`` under the adapter's tokenizer (no special tokens), or None without one."""
    tokenizer = getattr(adapter, "tokenizer", None)
    if tokenizer is None:
        return None
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def finish_of(completion_tokens: int | None, max_new_tokens: int) -> str:
    """``length`` when an answer decoded without a session used all of ``max_new_tokens``, else ``stop``."""
    return LENGTH if completion_tokens is not None and completion_tokens >= max_new_tokens else STOP


def refusal_usage(adapter: ModelAdapter, request: Request, message: str) -> TokenUsage | None:
    """The usage of refusing ``request`` with ``message``: its prompt's tokens and the message's."""
    prompt = prompt_token_count(adapter, request)
    completion = text_token_count(adapter, message)
    if prompt is None or completion is None:
        return None
    return TokenUsage(prompt_tokens=prompt, completion_tokens=completion)
