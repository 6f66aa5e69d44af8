"""What the guard does with one request and why: the decision, the response built on it, and their JSON records.

A decision is ``refuse``, ``answer`` or ``ecso`` (send the request through ECSO). Under the ``lsi``
policy the detector's score against the calibrated tau decides; ``lsi_then_ecso`` sends the scores
within ``ecso_margin`` of tau to ECSO; a check that raised becomes the ``on_error`` action, logged
and recorded in the decision.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.defend.ecso import ECSORecord
from pipeline.defend.usage import TokenUsage

DEFAULT_REFUSAL_MESSAGE = "I'm sorry, but I can't help with that request."
REFUSE, ANSWER, ROUTE_ECSO = "refuse", "answer", "ecso"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GuardDecision:
    """What the guard does with one request, and why.

    ``action`` is ``refuse``, ``answer`` or ``ecso``. ``score`` is the probe's refusal probability
    (None under the ECSO-only policy, or when the check failed; then ``error`` says why).
    """

    score: float | None
    tau: float
    action: str
    reason: str
    error: str | None = None

    @property
    def refused(self) -> bool:
        """True when the request is refused outright, without asking the model."""
        return self.action == REFUSE


@dataclass(frozen=True, kw_only=True)
class GuardedResponse:
    """What the user sees, the decision behind it, ECSO's steps when ECSO ran, and where the time went.

    ``finish_reason`` is ``stop`` (the answer ended, or the guard wrote the response), ``length``
    (``max_new_tokens`` cut it) or ``cancelled``; ``usage`` counts its tokens
    (:mod:`pipeline.defend.usage`; None for an adapter without a tokenizer).
    """

    decision: GuardDecision
    response: str
    ecso: ECSORecord | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    finish_reason: str = "stop"
    usage: TokenUsage | None = None


def decide(
    score: float,
    tau: float,
    detector: str,
    policy: str = "lsi",
    ecso_margin: float = 0.0,
) -> GuardDecision:
    """The action for a detector's score under ``policy``, with a reason a person can read.

    ``detector`` describes the detector in the reason (``"LSI at fusion layer 12 / safety layer 3"``).
    ``lsi`` refuses exactly when ``score > tau`` (the calibration's convention).
    ``lsi_then_ecso`` refuses above ``tau + ecso_margin``, answers at or below ``tau - ecso_margin``
    and sends the band between to ECSO.
    """
    if policy == "lsi_then_ecso" and tau - ecso_margin < score <= tau + ecso_margin:
        reason = (
            f"near tau: refusal score {score:.4f} within {ecso_margin:.4f} of tau {tau:.4f} ({detector}); ECSO decides"
        )
        return GuardDecision(score=float(score), tau=float(tau), action=ROUTE_ECSO, reason=reason)
    if policy not in ("lsi", "lsi_then_ecso"):
        raise ValueError(f"decide() takes the lsi or lsi_then_ecso policy, got {policy!r}")
    if score > tau:
        reason = f"refusal score {score:.4f} > tau {tau:.4f} ({detector})"
        return GuardDecision(score=float(score), tau=float(tau), action=REFUSE, reason=reason)
    reason = f"score below tau: refusal score {score:.4f} <= tau {tau:.4f} ({detector})"
    return GuardDecision(score=float(score), tau=float(tau), action=ANSWER, reason=reason)


def ecso_decision(tau: float) -> GuardDecision:
    """The decision under the ECSO-only policy: no probe, every request goes through ECSO."""
    return GuardDecision(
        score=None, tau=tau, action=ROUTE_ECSO, reason="policy ecso: the model checks its own answer (no probe)"
    )


def failed_decision(error: BaseException, tau: float, on_error: str, what: str) -> GuardDecision:
    """The decision for a check that raised: the configured ``on_error`` action, logged with the error."""
    message = f"{type(error).__name__}: {error}"
    action = REFUSE if on_error == "refuse" else ANSWER
    logger.error(
        "guard check failed for %s (%s); on_error=%s, so the request is %s",
        what,
        message,
        on_error,
        "refused" if action == REFUSE else "answered unchecked",
    )
    logger.debug("guard check failure", exc_info=error)
    reason = f"check failed ({message}); on_error policy: {on_error}"
    return GuardDecision(score=None, tau=float(tau), action=action, reason=reason, error=message)


def decision_record(decision: GuardDecision) -> dict[str, Any]:
    """A JSON-ready record of one decision."""
    return {
        "action": decision.action,
        "refused": decision.refused,
        "score": decision.score,
        "tau": decision.tau,
        "reason": decision.reason,
        "error": decision.error,
    }


def response_record(response: GuardedResponse) -> dict[str, Any]:
    """A JSON-ready record of one guarded response (decision, answer, ECSO steps, timings)."""
    return {
        **decision_record(response.decision),
        "response": response.response,
        "ecso": None if response.ecso is None else asdict(response.ecso),
        "seconds": {key: round(value, 4) for key, value in response.seconds.items()},
    }
