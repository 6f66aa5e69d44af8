"""LSI-guarded generation: score each request with the probe, refuse above tau, answer otherwise.

The guard reads the model's own hidden states under the two contrastive framings, feeds the
probe, and compares its refusal probability with the calibrated threshold. Only requests that
pass are sent to the model for an answer, so a refused request never produces model text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.features import lsi_features
from pipeline.models.base import ModelAdapter, Request, check_layers
from pipeline.probe import LSIProbe, ProbeMeta
from pipeline.prompts import ContrastivePrompts

DEFAULT_REFUSAL_MESSAGE = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class GuardDecision:
    """The probe's verdict on one request, with a reason a person can read."""

    score: float
    tau: float
    refused: bool
    reason: str


@dataclass(frozen=True)
class GuardedResponse:
    """What the user sees: the refusal message or the model's own answer, plus why."""

    decision: GuardDecision
    response: str


def decide(score: float, tau: float, fusion_layer: int, safety_layer: int) -> GuardDecision:
    """Refuse exactly when ``score > tau`` (the calibration's convention), and say why."""
    refused = bool(score > tau)
    if refused:
        reason = (
            f"LSI refusal score {score:.4f} > tau {tau:.4f} "
            f"at fusion layer {fusion_layer} / safety layer {safety_layer}"
        )
    else:
        reason = f"score below tau: LSI refusal score {score:.4f} <= tau {tau:.4f}"
    return GuardDecision(score=float(score), tau=float(tau), refused=refused, reason=reason)


# The fields of a probe's store provenance that must match the live model and prompts.
_MATCHED_FIELDS = ("model_name", "model_revision", "template_benign", "template_malicious")


def probe_mismatches(meta: ProbeMeta, adapter: ModelAdapter, prompts: ContrastivePrompts) -> list[str]:
    """Where the probe's training setup (from its store's provenance) differs from the live one.

    A probe records nothing when trained outside a store (empty provenance): nothing to check.
    """
    recorded = meta.store_provenance
    live = {
        "model_name": adapter.info.name,
        "model_revision": adapter.info.revision,
        "template_benign": prompts.benign,
        "template_malicious": prompts.malicious,
    }
    return [
        f"{key}: probe has {recorded[key]!r}, live setup has {live[key]!r}"
        for key in _MATCHED_FIELDS
        if key in recorded and recorded[key] != live[key]
    ]


class Guard:
    """A model behind an LSI probe: refuse when the probe's score exceeds tau, else answer greedily."""

    def __init__(
        self,
        adapter: ModelAdapter,
        probe: LSIProbe,
        meta: ProbeMeta,
        tau: float,
        prompts: ContrastivePrompts,
        refusal_message: str = DEFAULT_REFUSAL_MESSAGE,
    ) -> None:
        if not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number, got {tau}")
        # A probe trained on another model's states would give meaningless scores; fail loudly now.
        if meta.hidden_size != adapter.info.hidden_size:
            raise ValueError(
                f"probe expects hidden size {meta.hidden_size} but model {adapter.info.name!r} has "
                f"{adapter.info.hidden_size}; retrain the probe for this model"
            )
        check_layers([meta.fusion_layer, meta.safety_layer], adapter.info.num_layers)
        mismatches = probe_mismatches(meta, adapter, prompts)
        if mismatches:
            raise ValueError("probe was trained under a different setup: " + "; ".join(mismatches))
        self.adapter = adapter
        self.probe = probe
        self.meta = meta
        self.tau = float(tau)
        self.prompts = prompts
        self.refusal_message = refusal_message

    def scores(self, requests: Sequence[Request]) -> np.ndarray:
        """Refusal probabilities for a batch of requests, shape ``(len(requests),)``."""
        if not requests:
            return np.zeros(0, dtype=np.float32)
        features = lsi_features(self.adapter, requests, self.prompts, self.meta.fusion_layer, self.meta.safety_layer)
        return self.probe.score(features)

    def check(self, requests: Sequence[Request]) -> list[GuardDecision]:
        """One decision per request, from one batched pass over the contrastive prompts."""
        return [
            decide(float(score), self.tau, self.meta.fusion_layer, self.meta.safety_layer)
            for score in self.scores(requests)
        ]

    def generate(self, requests: Sequence[Request], max_new_tokens: int) -> list[GuardedResponse]:
        """Guarded answers: refused requests get the refusal message and never reach the model."""
        decisions = self.check(requests)
        allowed = [i for i, decision in enumerate(decisions) if not decision.refused]
        answers = self.adapter.generate([requests[i] for i in allowed], max_new_tokens) if allowed else []
        if len(answers) != len(allowed):
            raise RuntimeError(f"model returned {len(answers)} answers for {len(allowed)} requests")
        responses = [self.refusal_message] * len(requests)
        for i, answer in zip(allowed, answers, strict=True):
            responses[i] = answer
        return [GuardedResponse(decision, response) for decision, response in zip(decisions, responses, strict=True)]
