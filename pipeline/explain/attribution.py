"""Where the harmful-intent signal comes from: integrated gradients of ``||h_m - h_b||``.

The signal is the norm of ``delta_h = h_m - h_b``, the difference between the last-token states
of the malicious and the benign framing at the fusion layer. Integrated gradients (captum)
attribute it to the request's own token embeddings and to the image. Baseline for the request:
zero embeddings. The image's input depends on the model:

- Embedded default model (SmolLM2 + OCR): the OCR text's tokens (:mod:`pipeline.explain.embedded`).
- Hugging Face VLMs (LLaVA): the ``pixel_values`` (:mod:`pipeline.explain.hf_vlm`).

The parts: :mod:`~pipeline.explain.integrated` (the differentiable signal and the path
integral), :mod:`~pipeline.explain.spans` (token spans, OCR lines and words),
:mod:`~pipeline.explain.patches` (patch grid and crop) and :mod:`~pipeline.explain.record`
(the :class:`Attribution` record and its JSON). This module picks the part for an adapter and
re-exports the names its callers use.
"""

from __future__ import annotations

import torch

from pipeline.config import ContrastivePrompts
from pipeline.explain.embedded import embedded_attribution
from pipeline.explain.hf_vlm import hf_attribution
from pipeline.explain.integrated import DEFAULT_INTERNAL_BATCH, PATH_SEGMENTS, IGSettings
from pipeline.explain.record import Attribution, ImageKind, attribution_to_json, safe_name
from pipeline.models.base import ModelAdapter, Request, check_layers
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.hf_vlm import HFVisionLanguageAdapter

__all__ = [
    "DEFAULT_INTERNAL_BATCH",
    "Attribution",
    "ImageKind",
    "attribution_to_json",
    "intent_attribution",
    "safe_name",
]


def intent_attribution(
    adapter: ModelAdapter,
    request: Request,
    prompts: ContrastivePrompts,
    fusion_layer: int,
    steps: int,
    internal_batch_size: int = DEFAULT_INTERNAL_BATCH,
) -> Attribution:
    """Integrated gradients of ``||h_m - h_b||`` at ``fusion_layer`` for one request.

    ``steps`` is the number of interpolation points (Gauss-Legendre); ``internal_batch_size``
    how many of them go through the model at once.
    """
    check_layers([fusion_layer], adapter.info.num_layers)
    if steps < len(PATH_SEGMENTS) - 1:
        raise ValueError(f"steps must be at least {len(PATH_SEGMENTS) - 1} (one per path segment), got {steps}")
    if not request.text:
        raise ValueError("cannot attribute an empty request text")
    if isinstance(adapter, EmbeddedAdapter):
        run = embedded_attribution
    elif isinstance(adapter, HFVisionLanguageAdapter):
        run = hf_attribution  # type: ignore[assignment]
    else:
        raise TypeError(f"no attribution for adapter type {type(adapter).__name__}")
    # Gradients are taken w.r.t. the inputs only; the model's weights stay frozen.
    with torch.enable_grad():
        return run(adapter, request, prompts, IGSettings(fusion_layer, steps, internal_batch_size))  # type: ignore[arg-type]
