"""Chat completion objects and their SSE chunks, for answers the proxy writes itself.

Refusals (both modes) and local-mode answers are built here. The guard's decision goes into an
extra ``lsi_guard`` field, which OpenAI clients keep as an extra attribute and otherwise ignore.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

DECISION_HEADER = "X-LSI-Guard-Decision"
DECISION_FIELD = "lsi_guard"
DONE = "data: [DONE]\n\n"
_WORDS = re.compile(r"\s*\S+\s*|\s+")


def completion_id() -> str:
    """A fresh ``chatcmpl-`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(text: str, model: str, decision: dict[str, Any], answer_id: str | None = None) -> dict[str, Any]:
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
                "finish_reason": "stop",
            }
        ],
        "usage": None,
        DECISION_FIELD: decision,
    }


def text_pieces(text: str) -> list[str]:
    """``text`` cut into word-sized pieces whose concatenation is ``text`` (the streamed deltas)."""
    return _WORDS.findall(text) or [""]


def chunks(text: str, model: str, decision: dict[str, Any], answer_id: str | None = None) -> Iterator[str]:
    """The SSE events of ``text`` as ``chat.completion.chunk`` objects, ending with ``data: [DONE]``.

    The first chunk carries the role and the decision; then one chunk per piece of text; then the
    finish reason. The text is already complete (the guard answers in one call), so this streams
    a finished answer in pieces rather than token by token as it is decoded.
    """
    answer_id = answer_id or completion_id()
    created = int(time.time())

    def event(delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
        chunk = {
            "id": answer_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""}, None, **{DECISION_FIELD: decision})
    for piece in text_pieces(text):
        if piece:
            yield event({"content": piece}, None)
    yield event({}, "stop")
    yield DONE
