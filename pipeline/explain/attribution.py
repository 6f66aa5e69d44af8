"""Where a request's score comes from: integrated gradients of the detector's logit or of ``||h_m - h_b||``.

The target (:mod:`~pipeline.explain.targets`) is what the guard decides on, the shipped
detector's logit over the framings and layers it reads, or the method's contrast signal, the
norm of ``delta_h = h_m - h_b`` (malicious minus benign framing's last-token state) at the
fusion layer. Integrated gradients (captum) attribute it to the request's own token embeddings
and to the image. Baseline for the request: zero embeddings. The image's input depends on the
model:

- Embedded default model (SmolLM2 + OCR): the OCR text's tokens (:mod:`pipeline.explain.embedded`).
- Hugging Face VLMs (LLaVA): the ``pixel_values`` (:mod:`pipeline.explain.hf_vlm`).

The parts: :mod:`~pipeline.explain.integrated` (the differentiable signal and the path
integral), :mod:`~pipeline.explain.spans` (token spans, OCR lines and words),
:mod:`~pipeline.explain.patches` (patch grid and crop) and :mod:`~pipeline.explain.record`
(the :class:`Attribution` record and its JSON). This module picks the part for an adapter and
re-exports the names its callers use.
"""

from __future__ import annotations

import logging

import torch

from pipeline.config import ContrastivePrompts
from pipeline.explain.embedded import embedded_attribution
from pipeline.explain.hf_vlm import hf_attribution
from pipeline.explain.integrated import DEFAULT_INTERNAL_BATCH, PATH_SEGMENTS, IGSettings
from pipeline.explain.record import Attribution, ImageKind, attribution_to_json, safe_name
from pipeline.explain.targets import Target, attribution_target, contrast_target, detector_target
from pipeline.models.base import ModelAdapter, Request, check_layers
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.hf_vlm import HFVisionLanguageAdapter

logger = logging.getLogger(__name__)

# A completeness gap above this share of the target's change is logged: more steps would shrink it.
GAP_WARNING = 0.05

__all__ = [
    "DEFAULT_INTERNAL_BATCH",
    "Attribution",
    "ImageKind",
    "Target",
    "attribution_target",
    "attribution_to_json",
    "contrast_target",
    "detector_target",
    "intent_attribution",
    "safe_name",
]


def intent_attribution(
    adapter: ModelAdapter,
    request: Request,
    prompts: ContrastivePrompts,
    target: Target,
    steps: int,
    internal_batch_size: int = DEFAULT_INTERNAL_BATCH,
) -> Attribution:
    """Integrated gradients of ``target`` (:func:`detector_target`, :func:`contrast_target`) for one request.

    ``steps`` is the number of interpolation points (Gauss-Legendre); ``internal_batch_size``
    how many of them go through the model at once.
    """
    check_layers(list(target.layers), adapter.info.num_layers)
    if steps < len(PATH_SEGMENTS) - 1:
        raise ValueError(f"steps must be at least {len(PATH_SEGMENTS) - 1} (one per path segment), got {steps}")
    if not request.text:
        raise ValueError("cannot attribute an empty request text")
    control = [s for s in getattr(adapter, "added_tokens", ()) if s in request.text]
    if control:
        # Attribution maps tokens to characters with the tokenizer's offsets, which read these
        # strings as control tokens; the guard reads them as text, so the two would differ.
        raise ValueError(
            f"cannot attribute a request that contains the model's control strings ({', '.join(control)}): "
            "the guard reads them as plain text, attribution cannot yet"
        )
    if isinstance(adapter, EmbeddedAdapter):
        run = embedded_attribution
    elif isinstance(adapter, HFVisionLanguageAdapter):
        run = hf_attribution  # type: ignore[assignment]
    else:
        raise TypeError(f"no attribution for adapter type {type(adapter).__name__}")
    # Gradients are taken w.r.t. the inputs only; the model's weights stay frozen.
    with torch.enable_grad():
        settings = IGSettings(target=target, steps=steps, internal_batch_size=internal_batch_size)
        attribution = run(adapter, request, prompts, settings)  # type: ignore[arg-type]
    change = attribution.signal - attribution.baseline_signal
    if abs(attribution.convergence_delta) > GAP_WARNING * abs(change) + 1e-6:
        logger.warning(
            "integrated gradients of %s: the attributions sum to %.4g but the value changed by %.4g "
            "(gap %.1f%% of the change) with %d steps; raise the steps for a complete attribution",
            target.label,
            attribution.total,
            change,
            100 * abs(attribution.convergence_delta) / max(abs(change), 1e-12),
            steps,
        )
    return attribution
