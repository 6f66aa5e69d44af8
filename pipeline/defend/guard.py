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
``generate_many``, ``explain``); :mod:`pipeline.defend.admission` says which errors and why.

The guard's parts each have their module: :mod:`~pipeline.defend.decisions` (what to do and why),
:mod:`~pipeline.defend.admission` (limits), :mod:`~pipeline.defend.scoring` (the detector's score
over a request's views), :mod:`~pipeline.defend.routing` (the response once decided) and
:mod:`~pipeline.defend.loading` (a run's pieces and the checks that they fit), and
:mod:`~pipeline.defend.bundle` with :mod:`~pipeline.defend.pretrained` (the guard saved as one folder,
locally or on the Hugging Face Hub: :meth:`Guard.save_pretrained`, :meth:`Guard.from_pretrained`,
:meth:`Guard.push_to_hub`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import DEFAULT_LIMITS, ContrastivePrompts, ECSOConfig, GuardConfig, LimitsConfig, ModelConfig
from pipeline.defend import admission, scoring
from pipeline.defend.admission import REQUEST_LIMIT_ERRORS, describe, make_request
from pipeline.defend.bundle import BundleSettings, resolve_source
from pipeline.defend.deadline import Deadline, bounded
from pipeline.defend.decisions import GuardDecision, GuardedResponse, decide, ecso_decision, failed_decision
from pipeline.defend.ecso import ECSO
from pipeline.defend.loading import (
    checked_detector,
    load_run_pieces,
    overridden_guard_config,
    run_model_config,
    run_params,
)
from pipeline.defend.pretrained import (
    BundleContents,
    ModelChoice,
    bundle_adapter,
    guard_contents,
    read_bundle,
    save_and_push,
    write_bundle,
)
from pipeline.defend.streaming import GuardedStream
from pipeline.defend.views import request_views
from pipeline.detect.calibration import Calibration
from pipeline.detect.detector import Detector
from pipeline.detect.probe import LSIProbe, ProbeMeta
from pipeline.models.base import ModelAdapter, Request
from pipeline.models.session import PrefixSession

if TYPE_CHECKING:
    from pipeline.explain.attribution import Attribution


class Guard:
    """A model behind LSI, ECSO or both (see the module docstring for the policies and the limits).

    The constructor refuses a detector that does not fit the model or the prompts
    (:func:`~pipeline.defend.loading.checked_detector`); a bare :class:`LSIProbe` is read at
    ``meta``'s fusion and safety layers. ``model_config`` is the ``model`` params section the
    adapter was loaded with (kind, folder, dtype, device), which :meth:`save_pretrained` records;
    :meth:`from_run` and :meth:`from_pretrained` set it.
    """

    def __init__(
        self,
        *,
        adapter: ModelAdapter,
        detector: Detector | LSIProbe,
        meta: ProbeMeta,
        tau: float,
        prompts: ContrastivePrompts,
        config: GuardConfig | None = None,
        ecso_config: ECSOConfig | None = None,
        calibration: Calibration | None = None,
        limits: LimitsConfig | None = None,
        model_config: ModelConfig | None = None,
    ) -> None:
        detector = checked_detector(adapter.info, detector, meta, tau, prompts)
        self.adapter = adapter
        self.detector: Detector = detector
        self.meta = meta
        self.tau = float(tau)
        self.prompts = prompts
        self.config = config or GuardConfig()
        self.ecso_config = ecso_config or ECSOConfig()
        self.calibration = calibration
        self.limits = limits or DEFAULT_LIMITS
        self.model_config = model_config
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
        config = overridden_guard_config(params.guard, policy, on_error, ecso_margin, max_new_tokens)
        pieces = load_run_pieces(run, params, adapter)
        return cls(
            adapter=pieces.adapter,
            detector=pieces.detector,
            meta=pieces.meta,
            tau=pieces.calibration.tau,
            prompts=params.prompts,
            config=config,
            ecso_config=params.ecso,
            calibration=pieces.calibration,
            limits=params.limits,
            model_config=run_model_config(run, params),
        )

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        model: ModelChoice = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        ocr_cache: str | Path | None = None,
        policy: str | None = None,
        on_error: str | None = None,
        ecso_margin: float | None = None,
        max_new_tokens: int | None = None,
    ) -> Guard:
        """The guard saved by :meth:`save_pretrained` (or ``lsi-guard export``) in folder ``source``, or on the Hub.

        ``source`` is a local folder, else a Hugging Face Hub repository id fetched at ``revision``
        into ``cache_dir`` with ``token`` (``HF_HUB_OFFLINE=1``: from the cache only). Every file is
        checked against the bundle's manifest first. ``model`` names the model to run on: None, the
        folder the bundle records (relative to it; a bundle from the Hub records none); a model
        folder, loaded with the recorded kind, dtype and device; a :class:`ModelConfig`; or a loaded
        adapter. ``ocr_cache`` is where the embedded model keeps OCR results (default: a
        per-user cache). The keyword arguments after it override the saved ``guard`` settings.

        Raises :class:`~pipeline.defend.bundle.GuardBundleError` for a missing, changed or unknown
        bundle (naming the file), and :class:`~pipeline.defend.bundle.ModelIdentityError` for a model
        whose kind, name or revision differs from the one the guard was trained on; both are
        :class:`~pipeline.defend.loading.GuardLoadError`.
        """
        folder = resolve_source(source, revision=revision, cache_dir=cache_dir, token=token)
        bundle = read_bundle(folder)
        adapter, model_config = bundle_adapter(bundle, model, ocr_cache)
        settings = bundle.settings
        return cls(
            adapter=adapter,
            detector=bundle.detector,
            meta=bundle.meta,
            tau=settings.tau,
            prompts=settings.prompts,
            config=overridden_guard_config(settings.guard, policy, on_error, ecso_margin, max_new_tokens),
            ecso_config=settings.ecso,
            calibration=bundle.calibration,
            limits=settings.limits,
            model_config=model_config,
        )

    def _bundle_contents(self, model: ModelConfig | None, run: Mapping[str, Any] | None) -> BundleContents:
        settings = BundleSettings(
            tau=self.tau, prompts=self.prompts, guard=self.config, ecso=self.ecso_config, limits=self.limits
        )
        return guard_contents(
            detector=self.detector,
            meta=self.meta,
            calibration=self.calibration,
            settings=settings,
            model=model or self.model_config,
            info=self.adapter.info,
            run=run,
        )

    def save_pretrained(
        self, directory: str | Path, *, model: ModelConfig | None = None, run: Mapping[str, Any] | None = None
    ) -> Path:
        """Save this guard as one folder that :meth:`from_pretrained` loads; return the folder.

        The folder holds the detector (safetensors and JSON), tau and the calibration, the prompts,
        ``guard``, ``ecso`` and ``limits`` settings, the model's identity (kind, name, revision) and
        folder (relative to ``directory``), the run record ``run`` (default: this checkout's, see
        :func:`~pipeline.defend.pretrained.default_run_record`), and ``guard.json``, the manifest
        with each file's sha256 (:mod:`pipeline.defend.bundle`). It is written whole or not at all;
        an earlier saved guard in ``directory`` is replaced, any other non-empty folder refused.
        ``model`` describes the adapter when this guard was built without :attr:`model_config`.
        """
        return write_bundle(self._bundle_contents(model, run), directory)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        model: ModelConfig | None = None,
        run: Mapping[str, Any] | None = None,
    ) -> str:
        """Save this guard to a temporary folder and upload it to Hugging Face Hub repository ``repo_id``.

        The repository is created (``private`` as given) if missing; the upload is one commit on
        ``revision`` (default ``main``; another branch must exist already); returns the commit's
        URL. The pushed bundle records no model folder, so whoever loads it names the model
        (``from_pretrained(..., model=FOLDER)``), which must have the same kind, name and revision.
        ``token`` defaults to the logged-in one.
        """
        hub = {"token": token, "private": private, "revision": revision, "commit_message": commit_message}
        return save_and_push(self._bundle_contents(model, run), repo_id, **hub)

    def with_config(self, **changes: Any) -> Guard:
        """The same model, probe and tau under other ``guard`` settings (``policy="ecso"``, ...); nothing reloads."""
        return Guard(
            adapter=self.adapter,
            detector=self.detector,
            meta=self.meta,
            tau=self.tau,
            prompts=self.prompts,
            config=replace(self.config, **changes),
            ecso_config=self.ecso_config,
            calibration=self.calibration,
            limits=self.limits,
            model_config=self.model_config,
        )

    # -- limits -----------------------------------------------------------------------------

    def admit(self, request: Request) -> None:
        """Raise ``RequestTooLarge`` / ``ImageTooLarge`` for a request over :attr:`limits` (no model work).

        See :func:`pipeline.defend.admission.admit`.
        """
        admission.admit(request, self.limits)

    def admit_all(self, requests: Sequence[Request]) -> None:
        """:meth:`admit` for every request before any is run; the error names the request's position."""
        admission.admit_all(requests, self.limits)

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

    # -- scoring ----------------------------------------------------------------------------

    def scores(self, requests: Sequence[Request]) -> np.ndarray:
        """Refusal probabilities for a batch of requests, shape ``(len(requests),)``; errors propagate.

        Each is the highest over the request's :meth:`views`, all scored in one batched pass.
        """
        views = [self.views(request) for request in requests]
        return scoring.highest_view_scores(self.adapter, self.detector, self.prompts, self.layers, requests, views)

    def views(self, request: Request) -> list[str]:
        """The texts scored for ``request`` under ``guard.views``, the whole request (without forged-turn markup) first.

        See :mod:`pipeline.defend.views`.
        """
        control_strings = getattr(self.adapter, "added_tokens", ())
        return request_views(request.text, self.config.views, control_strings, self.config.view_words)

    def session_score(self, request: Request) -> tuple[PrefixSession | None, float]:
        """The probe's score, from a shared-prefix session when the adapter supports one (else None, batched).

        The session's cache then serves the answer; ``generate`` and ``bench/guard.py`` both start here.
        """
        views = self.views(request)
        return scoring.session_score(self.adapter, self.detector, self.prompts, self.layers, request, views)

    def decide(self, score: float) -> GuardDecision:
        """The decision for a probe score under this guard's policy, tau, margin and layers."""
        return decide(score, self.tau, self.detector.describe(), self.config.policy, self.config.ecso_margin)

    # -- checking ---------------------------------------------------------------------------

    def check_many(self, requests: Sequence[Request]) -> list[GuardDecision]:
        """One decision per request from one batched pass; a failing batch is retried one request at a time.

        So one unreadable image costs only its own request the ``on_error`` policy. A request over
        :attr:`limits` raises (every request is checked before the batch runs; see the module docstring).
        """
        self.admit_all(requests)
        if self.config.policy == "ecso":
            return [ecso_decision(self.tau) for _ in requests]
        try:
            return [self.decide(float(score)) for score in self.scores(requests)]
        except REQUEST_LIMIT_ERRORS:
            raise
        except Exception as exc:  # the configured failure policy applies to any check error
            if len(requests) == 1:
                return [failed_decision(exc, self.tau, self.config.on_error, describe(requests[0]))]
        return [self._check_one(request) for request in requests]

    def check(self, image: str | Path | None, text: str) -> GuardDecision:
        """The guard's decision on one request (an image path or None, and the text), without answering it.

        A request over :attr:`limits` raises, whatever ``on_error`` says (see the module docstring).
        """
        request = make_request(image, text)
        self.admit(request)
        if self.config.policy == "ecso":
            return ecso_decision(self.tau)
        return self._check_one(request)

    def _check_one(self, request: Request) -> GuardDecision:
        try:
            return self.decide(float(self.scores([request])[0]))
        except REQUEST_LIMIT_ERRORS:
            raise
        except Exception as exc:  # the configured failure policy applies to any check error
            return failed_decision(exc, self.tau, self.config.on_error, describe(request))

    # -- answering --------------------------------------------------------------------------

    def generate(self, image: str | Path | None, text: str, max_new_tokens: int | None = None) -> GuardedResponse:
        """Refuse, answer, or run ECSO on one request, as the policy decides.

        The check and the answer share the prompt's cached prefix when the adapter allows it.
        Errors in the answer itself (after the check) propagate. A request over :attr:`limits`
        raises before any model work, or when the adapter tokenises it, whatever ``on_error``
        says; under :meth:`time_limit`, so does one that runs past its deadline.
        """
        stream = self.generate_stream(image, text, max_new_tokens)
        for _ in stream:
            pass
        return stream.result()

    def generate_stream(
        self,
        image: str | Path | None,
        text: str,
        max_new_tokens: int | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GuardedStream:
        """:meth:`generate`, handed out as it is made: the check runs now, the answer as the stream is read.

        The returned :class:`~pipeline.defend.streaming.GuardedStream` has the decision at once;
        iterating it decodes the answer token by token (whole, for a refusal or ECSO's answer), and
        ``cancelled`` (asked before each token) stops it early. Read it on the thread that owns the
        model, inside any :meth:`time_limit`.
        """
        request = make_request(image, text)
        self.admit(request)
        tokens = max_new_tokens or self.config.max_new_tokens
        started = time.perf_counter()
        seconds: dict[str, float] = {}
        session: PrefixSession | None = None
        if self.config.policy == "ecso":
            decision = ecso_decision(self.tau)
        else:
            try:
                session, score = self.session_score(request)
                decision = self.decide(score)
            except REQUEST_LIMIT_ERRORS:
                raise
            except Exception as exc:  # the configured failure policy applies to any check error
                session = None
                decision = failed_decision(exc, self.tau, self.config.on_error, describe(request))
            if session is not None:
                seconds.update(prefix=session.timings.prefix, check=session.timings.check)
            else:
                seconds["check"] = time.perf_counter() - started
        return GuardedStream(
            decision=decision,
            request=request,
            session=session,
            max_new_tokens=tokens,
            adapter=self.adapter,
            ecso=self._ecso,
            refusal_message=self.config.refusal_message,
            seconds=seconds,
            started=started,
            cancelled=cancelled,
        )

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
