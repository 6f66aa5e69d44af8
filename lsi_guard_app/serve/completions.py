"""Chat completion objects and their SSE chunks, for answers the proxy writes itself.

Refusals (both modes) and local-mode answers are built here. The guard's decision goes into an
extra ``lsi_guard`` field, which OpenAI clients keep as an extra attribute and otherwise ignore.
``usage`` counts the answered prompt and the completion (:mod:`pipeline.defend.usage`);
``finish_reason`` is ``length`` when ``max_tokens`` cut the answer, else ``stop``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from pipeline.defend.usage import STOP, TokenUsage

DECISION_HEADER = "X-LSI-Guard-Decision"
DECISION_FIELD = "lsi_guard"
DONE = "data: [DONE]\n\n"
_WORDS = re.compile(r"\s*\S+\s*|\s+")


def completion_id() -> str:
    """A fresh ``chatcmpl-`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_record(usage: TokenUsage | None) -> dict[str, int] | None:
    """OpenAI's ``usage`` object, or None when the model's tokenizer could not count."""
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def completion(
    text: str,
    model: str,
    decision: dict[str, Any],
    answer_id: str | None = None,
    *,
    finish_reason: str = STOP,
    usage: TokenUsage | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` whose one choice is ``text``, with the decision in ``lsi_guard``."""
    return {
        "id": answer_id or completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_record(usage),
        DECISION_FIELD: decision,
    }


class ChunkStream:
    """The SSE events of one streamed ``chat.completion.chunk`` answer, written as its parts come."""

    def __init__(self, model: str, decision: dict[str, Any], answer_id: str | None = None) -> None:
        self.model = model
        self.decision = decision
        self.answer_id = answer_id or completion_id()
        self.created = int(time.time())

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {
            "id": self.answer_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def _choice(self, delta: dict[str, Any], finish: str | None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    def start(self) -> str:
        """The first chunk: the assistant's role, and the guard's decision."""
        return self._event(self._choice({"role": "assistant", "content": ""}, None), **{DECISION_FIELD: self.decision})

    def piece(self, text: str) -> str:
        """One piece of the answer's text."""
        return self._event(self._choice({"content": text}, None))

    def finish(self, finish_reason: str) -> str:
        """The chunk that ends the choice with its finish reason."""
        return self._event(self._choice({}, finish_reason))

    def usage(self, usage: TokenUsage | None) -> str:
        """The last chunk under ``stream_options.include_usage``: no choices, the usage."""
        return self._event([], usage=usage_record(usage))

    def error(self, message: str, kind: str, code: str | None) -> str:
        """An error met after the stream began (its status was already sent), in OpenAI's error shape."""
        return f"data: {json.dumps({'error': {'message': message, 'type': kind, 'param': None, 'code': code}})}\n\n"


def text_pieces(text: str) -> list[str]:
    """``text`` cut into word-sized pieces whose concatenation is ``text`` (the streamed deltas)."""
    return _WORDS.findall(text) or [""]


def chunks(
    text: str,
    model: str,
    decision: dict[str, Any],
    answer_id: str | None = None,
    *,
    finish_reason: str = STOP,
    usage: TokenUsage | None = None,
    include_usage: bool = False,
) -> Iterator[str]:
    """The SSE events of a text the proxy already has whole (a refusal), ending with ``data: [DONE]``.

    The first chunk carries the role and the decision; then one chunk per word-sized piece; then
    the finish reason; then, with ``include_usage``, a chunk with the usage.
    """
    stream = ChunkStream(model, decision, answer_id)
    yield stream.start()
    for piece in text_pieces(text):
        if piece:
            yield stream.piece(piece)
    yield stream.finish(finish_reason)
    if include_usage:
        yield stream.usage(usage)
    yield DONE
