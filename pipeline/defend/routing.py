"""What the guard says once it has decided: the refusal, the model's answer, or ECSO's.

An answer continues from the check's shared-prefix session when there is one, so the prompt's
prefix runs once for both; otherwise the adapter answers the request afresh. ECSO's first step,
the plain answer, continues from that session too when ECSO decodes greedily.
"""

from __future__ import annotations

import time

from pipeline.defend.decisions import ANSWER, REFUSE, GuardDecision
from pipeline.defend.ecso import ECSO, ECSORecord
from pipeline.models.base import ModelAdapter, Request
from pipeline.models.session import PrefixSession


def answer(adapter: ModelAdapter, request: Request, session: PrefixSession | None, tokens: int) -> str:
    """The model's answer to ``request``, from ``session``'s cache when there is one."""
    if session is not None:
        return session.answer(tokens)
    answers = adapter.generate([request], tokens)
    if len(answers) != 1:
        raise RuntimeError(f"model returned {len(answers)} answers for 1 request")
    return answers[0]


def respond(
    decision: GuardDecision,
    request: Request,
    session: PrefixSession | None,
    tokens: int,
    *,
    adapter: ModelAdapter,
    ecso: ECSO,
    refusal_message: str,
    seconds: dict[str, float],
) -> tuple[str, ECSORecord | None]:
    """The response ``decision`` calls for, and ECSO's record when ECSO ran.

    The seconds of the answer and of ECSO's steps are added to ``seconds``.
    """
    if decision.action == REFUSE:
        return refusal_message, None
    if decision.action == ANSWER:
        answer_started = time.perf_counter()
        response = answer(adapter, request, session, tokens)
        seconds["answer"] = time.perf_counter() - answer_started
        return response, None
    first = None
    if session is not None and ecso.config.decoding.greedy:
        # ECSO's first step is the plain answer: it continues from the check's cache (a
        # greedy loop, so only when ECSO decodes greedily too; otherwise ECSO answers itself).
        first = session.answer(tokens)
        seconds["answer"] = session.timings.answer
    ecso_started = time.perf_counter()
    record = ecso.run([request], answers=None if first is None else [first])[0]
    seconds["ecso"] = time.perf_counter() - ecso_started
    return record.final_answer, record
