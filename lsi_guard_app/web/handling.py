"""One press of the demo's button: check the input, run the guard, and draw the attribution maps when asked.

Every failure becomes a message for the page; nothing here knows about gradio.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lsi_guard_app.web.render import draw_attribution_maps
from pipeline.config import GUARD_POLICIES
from pipeline.data.images import ImageError, load_image
from pipeline.defend.guard import Guard, GuardedResponse, make_request

logger = logging.getLogger(__name__)


def input_problem(image: str | Path | None, text: str | None) -> str | None:
    """What is wrong with the user's input, in words, or None when the guard can take it."""
    try:
        make_request(image, text or "")
    except ValueError as exc:
        return str(exc)
    if image not in (None, ""):
        try:
            load_image(image)  # type: ignore[arg-type]
        except ImageError as exc:
            return f"the uploaded image cannot be used: {exc}"
    return None


def uploaded_path(value: object) -> str | None:
    """The server-side path of an uploaded image: gradio's file payload (a dict with ``path``), a path, or None."""
    if isinstance(value, dict):
        value = value.get("path")
    if value in (None, ""):
        return None
    return str(value)


@dataclass(frozen=True)
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
) -> DemoResult:
    """Check and answer one request, and attribute it when asked; every failure becomes a message.

    ``target`` is what the maps attribute (:meth:`Guard.explain`): the guard's detector's logit,
    the score it just decided on, or ``contrast``.
    """
    problem = input_problem(image, text)
    if problem is not None:
        return DemoResult(error=problem)
    assert text is not None
    image = image or None
    try:
        response = guard.generate(image, text)
    except Exception as exc:  # the page shows what failed; the log keeps the traceback
        logger.exception("the guard failed on a demo request")
        return DemoResult(error=f"the model failed on this request ({type(exc).__name__}: {exc})")
    if not explain:
        return DemoResult(response)
    started = time.perf_counter()
    token_map = out_dir / f"{name}-tokens.png"
    image_map = out_dir / f"{name}-image.png" if image is not None else None
    try:
        attribution = guard.explain(image, text, steps, target=target)
        draw_attribution_maps(attribution, text, image, token_map, image_map)
    except Exception as exc:  # the decision still stands; only the explanation is missing
        logger.exception("attribution failed on a demo request")
        note = f"No attribution maps: {type(exc).__name__}: {exc}"
        return DemoResult(response, explain_note=note, explain_seconds=time.perf_counter() - started)
    return DemoResult(response, token_map=token_map, image_map=image_map, explain_seconds=time.perf_counter() - started)
