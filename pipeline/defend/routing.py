"""What the guard says once it has decided: the refusal, the model's answer, or ECSO's.

An answer continues from the check's shared-prefix session when there is one, so the prompt's
prefix runs once for both; otherwise the adapter answers the request afresh. ECSO's first step,
the plain answer, continues from that session too when ECSO decodes greedily.

:func:`response_pieces` hands the response out as it is made: token by token when the model
answers from the session, whole otherwise (a refusal, ECSO's final answer, or an answer without a
session); :class:`~pipeline.defend.streaming.GuardedStream` wraps it for the guard.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipeline.defend.decisions import ANSWER, REFUSE, GuardDecision
from pipeline.defend.ecso import ECSO, ECSORecord
from pipeline.defend.usage import STOP, finish_of, text_token_count
from pipeline.models.base import ModelAdapter, Request
from pipeline.models.session import PrefixSession


@dataclass
class ResponseEnd:
    """How a response ended, filled in once :func:`response_pieces` is exhausted."""

    finish_reason: str = STOP
    completion_tokens: int | None = None
    ecso: ECSORecord | None = None


def fresh_answer(adapter: ModelAdapter, request: Request, tokens: int) -> str:
    """The model's answer to ``request`` from scratch (no session's cache to continue from)."""
    answers = adapter.generate([request], tokens)
    if len(answers) != 1:
        raise RuntimeError(f"model returned {len(answers)} answers for 1 request")
    return answers[0]


def response_pieces(
    decision: GuardDecision,
    request: Request,
    session: PrefixSession | None,
    tokens: int,
    *,
    adapter: ModelAdapter,
    ecso: ECSO,
    refusal_message: str,
    seconds: dict[str, float],
    end: ResponseEnd,
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """The response ``decision`` calls for, piece by piece; ``end`` says how it ended once they are all out.

    The seconds of the answer and of ECSO's steps are added to ``seconds``. ``cancelled`` stops a
    token-by-token answer before its next token (``end.finish_reason`` is then ``cancelled``).
    """
    if decision.action == REFUSE:
        end.completion_tokens = text_token_count(adapter, refusal_message)
        yield refusal_message
        return
    if decision.action == ANSWER:
        if session is not None:
            try:
                yield from session.answer_pieces(tokens, cancelled=cancelled)
            finally:
                seconds["answer"] = session.timings.answer
                end.finish_reason = session.finish_reason or STOP
                end.completion_tokens = session.completion_tokens
            return
        answer_started = time.perf_counter()
        text = fresh_answer(adapter, request, tokens)
        seconds["answer"] = time.perf_counter() - answer_started
        end.completion_tokens = text_token_count(adapter, text)
        end.finish_reason = finish_of(end.completion_tokens, tokens)
        yield text
        return
    first = None
    if session is not None and ecso.config.decoding.greedy:
        # ECSO's first step is the plain answer: it continues from the check's cache (a
        # greedy loop, so only when ECSO decodes greedily too; otherwise ECSO answers itself).
        first = session.answer(tokens)
        seconds["answer"] = session.timings.answer
    ecso_started = time.perf_counter()
    record = ecso.run([request], answers=None if first is None else [first])[0]
    seconds["ecso"] = time.perf_counter() - ecso_started
    end.ecso = record
    end.completion_tokens = text_token_count(adapter, record.final_answer)
    end.finish_reason = finish_of(end.completion_tokens, tokens)
    yield record.final_answer
