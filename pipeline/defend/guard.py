"""The guard: a model behind an LSI probe, ECSO, or both.

Policies (``GuardConfig.policy``):

- ``lsi``: the probe reads the model's hidden states under the two contrastive framings;
  a score above the calibrated tau is refused, anything else is answered.
- ``ecso``: no probe; the model answers, checks its own answer, and if it judges it harmful,
  answers again from a query-aware caption without the image (:mod:`pipeline.defend.ecso`).
- ``lsi_then_ecso``: clear cases are decided by the probe alone; scores within ``ecso_margin``
  of tau, where the probe is least sure, go through ECSO instead of a hard refusal or a
  blind answer.

For one request the check and the answer share one KV cache (:mod:`pipeline.models.session`):
the prompt's common prefix (chat header, image) runs once, the check adds the framings' short
tails, and the answer continues from the same cache. A check that fails (model error,
unreadable image) becomes a refusal or an answer as ``on_error`` says, and is logged and
recorded in the decision, never silent.

Limits (``Guard.limits``, the run's ``limits`` params section): a request over them is refused by
raising, whatever ``on_error`` says, in every method (``check``, ``check_many``, ``generate``,
``generate_many``, ``explain``). Text characters and image pixels (from the image header) are
checked before any model work and raise :class:`~pipeline.data.limits.RequestTooLarge` or
:class:`~pipeline.data.images.ImageTooLarge`; the adapter refuses a user turn over
``limits.max_request_tokens`` when it tokenises it (``RequestTooLong``); a request run under
:meth:`Guard.time_limit` that passes its deadline raises
:class:`~pipeline.defend.deadline.RequestTimedOut`. None of these becomes an ``on_error`` answer:
answering a request the guard never checked is what the limits exist to prevent, and refusing it
silently would hide why. Callers that serve many requests (the CLI, the demo) catch
:data:`REQUEST_LIMIT_ERRORS` and report them per request.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import (
    DEFAULT_LIMITS,
    ContrastivePrompts,
    ECSOConfig,
    GuardConfig,
    LimitsConfig,
    ModelConfig,
    Params,
    load_params,
)
from pipeline.data.images import ImageError, ImageTooLarge
from pipeline.data.limits import RequestTooLarge, check_image_size, check_request_text
from pipeline.defend.deadline import Deadline, RequestTimedOut, bounded
from pipeline.defend.ecso import ECSO, ECSORecord
from pipeline.defend.views import request_views
from pipeline.detect.calibration import Calibration, load_calibration
from pipeline.detect.detector import Detector, LSIDetector
from pipeline.detect.features import variant_groups
from pipeline.detect.probe import LSIProbe, ProbeMeta
from pipeline.detect.shipped import load_detector
from pipeline.errors import LSIGuardError
from pipeline.layout import CALIBRATION, PARAMS, PROBE_DIR
from pipeline.models.base import ModelAdapter, ModelLoadError, Request, check_layers
from pipeline.models.literal import RequestTooLong
from pipeline.models.registry import load_adapter
from pipeline.models.session import PrefixNotShared, PrefixSession, supports_prefix_sessions

if TYPE_CHECKING:
    from pipeline.explain.attribution import Attribution

# Over a limit or out of time: refused with the error, whatever on_error says. The token limit is
# enforced by the adapters when they tokenise (pipeline.models.literal).
REQUEST_LIMIT_ERRORS: tuple[type[Exception], ...] = (RequestTooLarge, ImageTooLarge, RequestTooLong, RequestTimedOut)

DEFAULT_REFUSAL_MESSAGE = "I'm sorry, but I can't help with that request."
REFUSE, ANSWER, ROUTE_ECSO = "refuse", "answer", "ecso"

logger = logging.getLogger(__name__)


class GuardLoadError(LSIGuardError, RuntimeError):
    """A run folder that lacks what the guard needs (params, trained probe, calibration, model)."""


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class GuardedResponse:
    """What the user sees, the decision behind it, ECSO's steps when ECSO ran, and where the time went."""

    decision: GuardDecision
    response: str
    ecso: ECSORecord | None = None
    seconds: dict[str, float] = field(default_factory=dict)


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
        return GuardDecision(float(score), float(tau), ROUTE_ECSO, reason)
    if policy not in ("lsi", "lsi_then_ecso"):
        raise ValueError(f"decide() takes the lsi or lsi_then_ecso policy, got {policy!r}")
    if score > tau:
        reason = f"refusal score {score:.4f} > tau {tau:.4f} ({detector})"
        return GuardDecision(float(score), float(tau), REFUSE, reason)
    reason = f"score below tau: refusal score {score:.4f} <= tau {tau:.4f} ({detector})"
    return GuardDecision(float(score), float(tau), ANSWER, reason)


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
    return GuardDecision(None, float(tau), action, reason, error=message)


# The fields of a probe's store provenance that must match the live model and prompts.
_MATCHED_FIELDS = ("model_name", "model_revision", "template_benign", "template_malicious", "prompt_position")
# Where a mismatched field is set, when it is a params.yaml key.
_PARAMS_KEYS = {
    "template_benign": "prompts.benign",
    "template_malicious": "prompts.malicious",
    "prompt_position": "prompts.position",
}


def probe_mismatches(meta: ProbeMeta, adapter: ModelAdapter, prompts: ContrastivePrompts) -> list[str]:
    """Where the probe's training setup (from its store's provenance) differs from the live one.

    A probe records nothing when trained outside a store (empty provenance): nothing to check.
    A store written before the prompt position was recorded was written under ``before``.
    """
    recorded = dict(meta.store_provenance)
    if recorded:
        recorded.setdefault("prompt_position", "before")
    live = {
        "model_name": adapter.info.name,
        "model_revision": adapter.info.revision,
        "template_benign": prompts.benign,
        "template_malicious": prompts.malicious,
        "prompt_position": prompts.position,
    }
    return [
        f"{key}: probe has {recorded[key]!r}, live setup has {live[key]!r}"
        + (f" (params.yaml {_PARAMS_KEYS[key]})" if key in _PARAMS_KEYS else "")
        for key in _MATCHED_FIELDS
        if key in recorded and recorded[key] != live[key]
    ]


def make_request(image: str | Path | None, text: str) -> Request:
    """A request from what a user typed and uploaded; an empty text is refused with a clear error."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the request text is empty: type what you want to ask")
    return Request(text=text, image=None if image in (None, "") else Path(image))


def _describe(request: Request) -> str:
    """A short description of a request for log lines."""
    text = request.text if len(request.text) <= 60 else request.text[:57] + "..."
    return f"request {text!r}" + (f" with image {request.image}" if request.image is not None else "")


def _run_path(run: Path, path: str) -> str:
    """A params path read relative to the run folder, unless it is absolute."""
    return path if Path(path).is_absolute() else str(run / path)


def run_params(run_dir: str | Path) -> Params:
    """The ``params.yaml`` of a run folder; a folder without one raises :class:`GuardLoadError` saying so."""
    path = Path(run_dir) / PARAMS
    if not path.is_file():
        raise GuardLoadError(f"{path}: no params file; --run must be the project folder of a run")
    return load_params(path)


class Guard:
    """A model behind LSI, ECSO or both (see the module docstring for the policies and the limits)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        detector: Detector | LSIProbe,
        meta: ProbeMeta,
        tau: float,
        prompts: ContrastivePrompts,
        config: GuardConfig | None = None,
        ecso_config: ECSOConfig | None = None,
        calibration: Calibration | None = None,
        limits: LimitsConfig | None = None,
    ) -> None:
        if not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number, got {tau}")
        # A probe trained on another model's states would give meaningless scores; fail loudly now.
        if meta.hidden_size != adapter.info.hidden_size:
            raise ValueError(
                f"probe expects hidden size {meta.hidden_size} but model {adapter.info.name!r} has "
                f"{adapter.info.hidden_size}; retrain the probe for this model"
            )
        if isinstance(detector, LSIProbe):
            detector = LSIDetector(detector, meta.fusion_layer, meta.safety_layer)
        check_layers(list(detector.layers), adapter.info.num_layers)
        mismatches = probe_mismatches(meta, adapter, prompts)
        if mismatches:
            raise ValueError("probe was trained under a different setup: " + "; ".join(mismatches))
        self.adapter = adapter
        self.detector: Detector = detector
        self.meta = meta
        self.tau = float(tau)
        self.prompts = prompts
        self.config = config or GuardConfig()
        self.ecso_config = ecso_config or ECSOConfig()
        self.calibration = calibration
        self.limits = limits or DEFAULT_LIMITS
        self.layers = list(detector.layers)
        self._ecso = ECSO(adapter, self.ecso_config)

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path = ".",
        *,
        policy: str | None = None,
        on_error: str | None = None,
        ecso_margin: float | None = None,
        max_new_tokens: int | None = None,
        adapter: ModelAdapter | None = None,
    ) -> Guard:
        """The guard of a finished pipeline run: its params, trained probe, calibrated tau and model.

        ``run_dir`` is the project folder ``dvc repro`` (``bash scripts/run.sh``) ran in; relative
        paths in its ``params.yaml`` are read from there, and its ``limits`` section becomes
        :attr:`limits`. Keyword arguments override the ``guard`` section; ``adapter`` replaces
        loading the model (tests, or a model already loaded).
        """
        run = Path(run_dir)
        params = run_params(run)
        overrides = {
            "policy": policy,
            "on_error": on_error,
            "ecso_margin": ecso_margin,
            "max_new_tokens": max_new_tokens,
        }
        config = replace(params.guard, **{key: value for key, value in overrides.items() if value is not None})
        try:
            detector, meta = load_detector(run / PROBE_DIR)
            calibration = load_calibration(run / CALIBRATION)
        except FileNotFoundError as exc:
            raise GuardLoadError(
                f"{exc}. {run} has no finished run: run `bash scripts/run.sh` there (dvc repro) first"
            ) from None
        if adapter is None:
            model: ModelConfig = replace(
                params.model,
                path=_run_path(run, params.model.path),
                ocr_cache=_run_path(run, params.model.ocr_cache),
            )
            try:
                adapter = load_adapter(model, params.limits.max_request_tokens)
            except (FileNotFoundError, ModelLoadError) as exc:
                raise GuardLoadError(f"cannot load the run's model: {exc}") from None
        return cls(
            adapter, detector, meta, calibration.tau, params.prompts, config, params.ecso, calibration, params.limits
        )

    def with_config(self, **changes: Any) -> Guard:
        """The same model, probe and tau under other ``guard`` settings (``policy="ecso"``, ...); nothing reloads."""
        config = replace(self.config, **changes)
        return Guard(
            self.adapter,
            self.detector,
            self.meta,
            self.tau,
            self.prompts,
            config,
            self.ecso_config,
            self.calibration,
            self.limits,
        )

    # -- limits -----------------------------------------------------------------------------

    def admit(self, request: Request) -> None:
        """Raise ``RequestTooLarge`` / ``ImageTooLarge`` for a request over :attr:`limits` (no model work).

        Checks the text's characters and the image's pixels from its header. A missing or
        unreadable image is not a limit: the check fails on it and ``on_error`` applies, as for
        any other failed check.
        """
        check_request_text(request.text, self.limits)
        if request.image is not None:
            try:
                check_image_size(request.image, self.limits)
            except ImageTooLarge:
                raise
            except ImageError:
                pass  # left to the check, whose failure follows on_error and is recorded

    def admit_all(self, requests: Sequence[Request]) -> None:
        """:meth:`admit` for every request before any is run; the error names the request's position."""
        for number, request in enumerate(requests, start=1):
            try:
                self.admit(request)
            except (RequestTooLarge, ImageTooLarge) as exc:
                raise type(exc)(f"request {number} of {len(requests)}: {exc}") from None

    @contextmanager
    def time_limit(
        self, seconds: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> Iterator[Deadline]:
        """Bound the model work in the body to ``seconds`` (default ``limits.request_timeout_s``).

        Every forward pass of the model checks the deadline first and raises
        :class:`~pipeline.defend.deadline.RequestTimedOut` once it has passed, so the body stops
        within one decoder block's work of it; OCR and image decoding are not interrupted
        (:mod:`pipeline.defend.deadline`).
        """
        deadline = Deadline(self.limits.request_timeout_s if seconds is None else seconds, clock)
        with bounded(self.adapter, deadline):
            yield deadline

    # -- batched scoring --------------------------------------------------------------------

    def scores(self, requests: Sequence[Request]) -> np.ndarray:
        """Refusal probabilities for a batch of requests, shape ``(len(requests),)``; errors propagate.

        Only the framings the detector reads run, each stopped after the deepest layer it reads.
        """
        if not requests:
            return np.zeros(0, dtype=np.float32)
        views = [self.views(request) for request in requests]
        flat = [
            Request(text=text, image=request.image)
            for request, texts in zip(requests, views, strict=True)
            for text in texts
        ]
        scores = self._view_scores(flat)
        ends = np.cumsum([len(texts) for texts in views])
        highest = [scores[end - len(texts) : end].max() for end, texts in zip(ends, views, strict=True)]
        return np.asarray(highest, dtype=scores.dtype)

    def views(self, request: Request) -> list[str]:
        """The texts scored for ``request`` under ``guard.views``, the whole request first.

        See :mod:`pipeline.defend.views`.
        """
        control_strings = getattr(self.adapter, "added_tokens", ())
        return request_views(request.text, self.config.views, control_strings, self.config.view_words)

    def _view_scores(self, requests: Sequence[Request]) -> np.ndarray:
        """The detector's score of each request's text as it is, one batched pass."""
        variants = self.detector.variants
        groups = variant_groups(requests, self.prompts, variants=variants)
        states = self.adapter.group_states(groups, self.layers).numpy()
        return self.detector.score_states(states, self.layers, variants)

    def check_many(self, requests: Sequence[Request]) -> list[GuardDecision]:
        """One decision per request from one batched pass; a failing batch is retried one request at a time.

        So one unreadable image costs only its own request the ``on_error`` policy. A request over
        :attr:`limits` raises (every request is checked before the batch runs; see the module docstring).
        """
        self.admit_all(requests)
        if self.config.policy == "ecso":
            return [self._ecso_decision() for _ in requests]
        try:
            return [self.decide(float(score)) for score in self.scores(requests)]
        except REQUEST_LIMIT_ERRORS:
            raise
        except Exception as exc:  # the configured failure policy applies to any check error
            if len(requests) == 1:
                return [failed_decision(exc, self.tau, self.config.on_error, _describe(requests[0]))]
        return [self._check_one(request) for request in requests]

    # -- one request ------------------------------------------------------------------------

    def check(self, image: str | Path | None, text: str) -> GuardDecision:
        """The guard's decision on one request (an image path or None, and the text), without answering it.

        A request over :attr:`limits` raises, whatever ``on_error`` says (see the module docstring).
        """
        request = make_request(image, text)
        self.admit(request)
        if self.config.policy == "ecso":
            return self._ecso_decision()
        return self._check_one(request)

    def generate(self, image: str | Path | None, text: str, max_new_tokens: int | None = None) -> GuardedResponse:
        """Refuse, answer, or run ECSO on one request, as the policy decides.

        The check and the answer share the prompt's cached prefix when the adapter allows it.
        Errors in the answer itself (after the check) propagate. A request over :attr:`limits`
        raises before any model work, or when the adapter tokenises it, whatever ``on_error``
        says; under :meth:`time_limit`, so does one that runs past its deadline.
        """
        request = make_request(image, text)
        self.admit(request)
        tokens = max_new_tokens or self.config.max_new_tokens
        started = time.perf_counter()
        seconds: dict[str, float] = {}
        session: PrefixSession | None = None
        if self.config.policy == "ecso":
            decision = self._ecso_decision()
        else:
            try:
                session, score = self.session_score(request)
                decision = self.decide(score)
            except REQUEST_LIMIT_ERRORS:
                raise
            except Exception as exc:  # the configured failure policy applies to any check error
                session = None
                decision = failed_decision(exc, self.tau, self.config.on_error, _describe(request))
            if session is not None:
                seconds.update(prefix=session.timings.prefix, check=session.timings.check)
            else:
                seconds["check"] = time.perf_counter() - started

        record: ECSORecord | None = None
        if decision.action == REFUSE:
            response = self.config.refusal_message
        elif decision.action == ANSWER:
            answer_started = time.perf_counter()
            response = self._answer(request, session, tokens)
            seconds["answer"] = time.perf_counter() - answer_started
        else:
            first = None
            if session is not None and self.ecso_config.decoding.greedy:
                # ECSO's first step is the plain answer: it continues from the check's cache (a
                # greedy loop, so only when ECSO decodes greedily too; otherwise ECSO answers itself).
                first = session.answer(tokens)
                seconds["answer"] = session.timings.answer
            ecso_started = time.perf_counter()
            record = self._ecso.run([request], answers=None if first is None else [first])[0]
            seconds["ecso"] = time.perf_counter() - ecso_started
            response = record.final_answer
        seconds["total"] = time.perf_counter() - started
        return GuardedResponse(decision, response, record, seconds)

    def generate_many(self, requests: Sequence[Request], max_new_tokens: int | None = None) -> list[GuardedResponse]:
        """:meth:`generate` for each request in turn; every request is checked against :attr:`limits` first."""
        self.admit_all(requests)
        return [self.generate(request.image, request.text, max_new_tokens) for request in requests]

    def explain(self, image: str | Path | None, text: str, steps: int = 32, target: str = "detector") -> Attribution:
        """Integrated-gradients attribution of one request's score over its tokens and image.

        ``target``: ``detector`` attributes the logit of the detector this guard decides with
        (``sigmoid`` of it is the refusal score); ``contrast`` attributes the method's contrast
        signal ``||h_m - h_b||`` at the probe's fusion layer. The record names the target and the
        detector. A request over :attr:`limits` raises before any model work.
        """
        # Imported on first use: attribution brings captum and every adapter's model classes, about
        # two seconds of start-up that checking and answering requests never need.
        from pipeline.explain.attribution import attribution_target, intent_attribution

        request = make_request(image, text)
        self.admit(request)
        chosen = attribution_target(target, self.detector, self.meta.fusion_layer)
        return intent_attribution(self.adapter, request, self.prompts, chosen, steps)

    def decide(self, score: float) -> GuardDecision:
        """The decision for a probe score under this guard's policy, tau, margin and layers."""
        return decide(score, self.tau, self.detector.describe(), self.config.policy, self.config.ecso_margin)

    # -- internals --------------------------------------------------------------------------

    def _ecso_decision(self) -> GuardDecision:
        return GuardDecision(None, self.tau, ROUTE_ECSO, "policy ecso: the model checks its own answer (no probe)")

    def _check_one(self, request: Request) -> GuardDecision:
        try:
            return self.decide(float(self.scores([request])[0]))
        except REQUEST_LIMIT_ERRORS:
            raise
        except Exception as exc:  # the configured failure policy applies to any check error
            return failed_decision(exc, self.tau, self.config.on_error, _describe(request))

    def session_score(self, request: Request) -> tuple[PrefixSession | None, float]:
        """The probe's score, from a shared-prefix session when the adapter supports one (else None, batched).

        The session's cache then serves the answer; ``generate`` and ``bench/guard.py`` both start here.
        """
        if supports_prefix_sessions(self.adapter):
            texts = self.prompts.variants(request.text)
            variants = self.detector.variants
            try:
                # The framings the detector reads, then the plain prompt the answer continues.
                session = PrefixSession(
                    self.adapter,  # type: ignore[arg-type]
                    [texts[v] for v in variants] + [texts["plain"]],
                    request.image,
                )
            except PrefixNotShared:
                session = None
            if session is not None:
                states = session.states(self.layers).numpy()[None]
                score = float(self.detector.score_states(states, self.layers, variants)[0])
                extra = [Request(text=text, image=request.image) for text in self.views(request)[1:]]
                if extra:
                    score = max(score, float(self._view_scores(extra).max()))
                return session, score
        return None, float(self.scores([request])[0])

    def _answer(self, request: Request, session: PrefixSession | None, tokens: int) -> str:
        if session is not None:
            return session.answer(tokens)
        answers = self.adapter.generate([request], tokens)
        if len(answers) != 1:
            raise RuntimeError(f"model returned {len(answers)} answers for 1 request")
        return answers[0]


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
