"""One press of the demo's button: check the input, run the guard, and draw the attribution maps when asked.

Every failure becomes a message for the page; nothing here knows about gradio.

Limits (the run's ``limits`` params section, ``Guard.limits``): the text's characters and the
image's pixels (from its header) are checked before any model work; the model's tokeniser refuses
a user turn over ``limits.max_request_tokens``; and the whole request, answer and attribution
maps together, gets ``limits.request_timeout_s`` of model work. The deadline is checked before
every forward pass of the model and of each decoder block (:mod:`pipeline.defend.deadline`), so a
request stops within one block's work of it; OCR and image decoding are not interrupted, which
the pixel limit bounds instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lsi_guard_app.web.render import draw_attribution_maps
from pipeline.config import DEFAULT_LIMITS, GUARD_POLICIES, LimitsConfig
from pipeline.data.limits import RequestTooLarge, check_image_size, check_request_text
from pipeline.defend.admission import REQUEST_LIMIT_ERRORS, make_request
from pipeline.defend.deadline import RequestTimedOut, bounded
from pipeline.defend.decisions import GuardedResponse
from pipeline.defend.guard import Guard
from pipeline.errors import LSIGuardError
from pipeline.images import ImageError, load_image

logger = logging.getLogger(__name__)


class UnknownPolicy(LSIGuardError, ValueError):
    """A policy name the demo does not serve (sent through the HTTP API, which skips the page's choices)."""


def input_problem(image: str | Path | None, text: str | None, limits: LimitsConfig = DEFAULT_LIMITS) -> str | None:
    """What is wrong with the user's input, in words, or None when the guard can take it.

    Cheap checks first: the text's length, then the image's size from its header, and only then
    a full decode of the image.
    """
    try:
        make_request(image, text or "")
    except ValueError as exc:
        return str(exc)
    try:
        check_request_text(text or "", limits)
    except RequestTooLarge as exc:
        return f"the request is too long: {exc}"
    if image not in (None, ""):
        try:
            check_image_size(image, limits)  # type: ignore[arg-type]
            load_image(image, limits.max_image_pixels)  # type: ignore[arg-type]
        except ImageError as exc:  # ImageTooLarge included
            return f"the uploaded image cannot be used: {exc}"
    return None


def choose_guard(guards: dict[str, Guard], policy: object) -> Guard:
    """The guard for ``policy``; an unknown one raises :class:`UnknownPolicy` naming it and the choices.

    The page's radio offers only the known policies, but gradio's HTTP API passes any value through.
    """
    if isinstance(policy, str) and policy in guards:
        return guards[policy]
    raise UnknownPolicy(f"unknown policy {policy!r}; choose one of {', '.join(sorted(guards))}")


def uploaded_path(value: object) -> str | None:
    """The server-side path of an uploaded image: gradio's file payload (a dict with ``path``), a path, or None."""
    if isinstance(value, dict):
        value = value.get("path")
    if value in (None, ""):
        return None
    return str(value)


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    """What one press of the button produced: a guarded response or an error, and the attribution maps."""

    response: GuardedResponse | None = None
    error: str | None = None
    token_map: Path | None = None
    image_map: Path | None = None
    explain_note: str | None = None
    explain_seconds: float | None = None


def policy_guards(guard: Guard) -> dict[str, Guard]:
    """One guard per policy over the same model, probe and tau (nothing is reloaded)."""
    return {
        policy: guard if policy == guard.config.policy else guard.with_config(policy=policy)
        for policy in GUARD_POLICIES
    }


def run_request(
    guard: Guard,
    image: str | None,
    text: str | None,
    explain: bool,
    steps: int,
    out_dir: Path,
    name: str,
    target: str = "detector",
    clock: Callable[[], float] = time.monotonic,
) -> DemoResult:
    """Check and answer one request, and attribute it when asked; every failure becomes a message.

    ``target`` is what the maps attribute (:meth:`Guard.explain`): the guard's detector's logit,
    the score it just decided on, or ``contrast``. The request is checked against
    ``guard.limits`` first, and its model work, answer and maps together, is bounded by
    ``limits.request_timeout_s`` (see the module docstring); ``clock`` is the deadline's clock.
    A request that runs out of time in the answer gets an error; in the maps, the decision
    stands and the note says the maps ran out of time.
    """
    problem = input_problem(image, text, guard.limits)
    if problem is not None:
        return DemoResult(error=problem)
    assert text is not None
    image = image or None
    try:
        with guard.time_limit(clock=clock) as deadline:
            response = guard.generate(image, text)
    except REQUEST_LIMIT_ERRORS as exc:  # over a limit, or out of time: the message names the limit
        logger.warning("demo request refused: %s", exc)
        return DemoResult(error=str(exc))
    except Exception as exc:  # the page shows what failed; the log keeps the traceback
        logger.exception("the guard failed on a demo request")
        return DemoResult(error=f"the model failed on this request ({type(exc).__name__}: {exc})")
    if not explain:
        return DemoResult(response=response)
    started = time.perf_counter()
    token_map = out_dir / f"{name}-tokens.png"
    image_map = out_dir / f"{name}-image.png" if image is not None else None
    try:
        with bounded(guard.adapter, deadline):
            attribution = guard.explain(image, text, steps, target=target)
        draw_attribution_maps(attribution, text, image, token_map, image_map)
    except RequestTimedOut as exc:
        note = f"No attribution maps: {exc}"
        return DemoResult(response=response, explain_note=note, explain_seconds=time.perf_counter() - started)
    except Exception as exc:  # the decision still stands; only the explanation is missing
        logger.exception("attribution failed on a demo request")
        note = f"No attribution maps: {type(exc).__name__}: {exc}"
        return DemoResult(response=response, explain_note=note, explain_seconds=time.perf_counter() - started)
    return DemoResult(
        response=response, token_map=token_map, image_map=image_map, explain_seconds=time.perf_counter() - started
    )
