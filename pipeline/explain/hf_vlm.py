"""Attribution on Hugging Face VLMs (LLaVA): request tokens and the image's pixels.

The image's ``pixel_values`` are the second input. Baseline: a black image passed through the
model's own image processor, so it is black *before* normalisation (``(0 - mean) / std`` per
channel in normalised space, not zeros there). The saliency map is ``|attribution|`` summed over
channels; the signed attribution is also summed per patch of the vision encoder's grid, the
units the encoder actually sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import ContrastivePrompts
from pipeline.explain.integrated import Framing, IGSettings, frame, integrate_framings
from pipeline.explain.patches import crop_region, patch_grid
from pipeline.explain.record import Attribution
from pipeline.explain.spans import locate_request
from pipeline.images import load_image
from pipeline.models.base import Request
from pipeline.models.hf_vlm import HFVisionLanguageAdapter


def _hf_framing(
    adapter: HFVisionLanguageAdapter, request: Request, prompts: ContrastivePrompts, name: str
) -> tuple[Framing, torch.Tensor | None]:
    """Tokenise framing ``name`` exactly as the adapter does; return it and its ``pixel_values``.

    The processor expands ``<image>`` into many tokens, which shifts every later position; the
    request sits after the image, so its span is found in the unexpanded text and counted from
    the end.
    """
    framed = prompts.framed(name, request.text)
    framed_request = Request(framed, request.image)
    prompt = adapter.prompt_text(framed_request)
    chars = locate_request(prompt, framed, prompts.request_offset(name), request.text)
    text = adapter.tokenizer(prompt, return_offsets_mapping=True)
    text_offsets = [(int(a), int(b)) for a, b in text["offset_mapping"]]
    batch = adapter.encode([framed_request])
    ids = batch["input_ids"][0].tolist()
    # Map text-token positions to positions in the expanded ids by their distance from the end.
    shift = len(ids) - len(text_offsets)
    offsets = [(0, 0)] * shift + text_offsets if shift >= 0 else text_offsets[-shift:]
    framing = frame(adapter.model, ids, prompt, offsets, {"request": chars})
    first, stop = framing.spans["request"]
    if ids[first:stop] != list(text["input_ids"][first - shift : stop - shift]):
        raise RuntimeError("the processor tokenised the request differently from the tokenizer alone")
    pixels = batch["pixel_values"] if "pixel_values" in batch else None
    return framing, pixels


def black_pixels(adapter: HFVisionLanguageAdapter, size: tuple[int, int]) -> torch.Tensor:
    """``pixel_values`` of an all-black image of ``size``, through the model's own image processor."""
    black = Image.new("RGB", size, (0, 0, 0))
    image_processor = adapter.processor.image_processor  # type: ignore[attr-defined]
    values = image_processor(images=[black], return_tensors="pt")["pixel_values"]
    return values.to(adapter.device, adapter.dtype)


def _first_image_token(adapter: HFVisionLanguageAdapter, ids: list[int]) -> int:
    """Position of the first image token: nothing from there on can be cached, it depends on the pixels."""
    image_token = getattr(adapter.model.config, "image_token_id", None)
    return ids.index(image_token) if image_token in ids else len(ids)


def _patch_fields(adapter: HFVisionLanguageAdapter, pixel_attr: np.ndarray) -> dict[str, Any]:
    """Patch scores for one ``(channels, h, w)`` image; nothing for tiled or flattened pixel layouts."""
    vision = getattr(adapter.model.config, "vision_config", None)
    patch_size = getattr(vision, "patch_size", None)
    if not isinstance(patch_size, int) or pixel_attr.ndim != 3:
        return {}
    return {"patch_scores": patch_grid(pixel_attr, patch_size), "patch_size": patch_size}


def hf_attribution(
    adapter: HFVisionLanguageAdapter,
    request: Request,
    prompts: ContrastivePrompts,
    settings: IGSettings,
) -> Attribution:
    """IG over the request tokens and, with an image, over its pixels."""
    variants = settings.target.variants
    built = {v: _hf_framing(adapter, request, prompts, v) for v in variants}
    framings = {v: framing for v, (framing, _) in built.items()}
    reference, pixels = built[variants[0]]
    with_pixels = pixels is not None and request.image is not None
    limit = min(_first_image_token(adapter, framing.input_ids) for framing in framings.values())
    fields: dict[str, Any] = {}
    pixel_pair = None
    if with_pixels:
        assert pixels is not None and request.image is not None
        size = load_image(request.image).size
        pixel_pair = (pixels, black_pixels(adapter, size))
    attributions, at_input, at_baseline = integrate_framings(
        adapter.model, adapter.blocks, framings, ["request"], limit, settings, pixel_pair
    )
    token_scores = attributions[0].sum(dim=-1).tolist()
    if with_pixels:
        pixel_attr = attributions[1][0] if attributions[1].dim() == 4 else attributions[1]  # (channels, h, w)
        fields = {
            "image_kind": "pixels",
            "pixel_map": pixel_attr.abs().sum(dim=0).numpy().astype(np.float32),
            "pixel_box": crop_region(adapter.processor.image_processor, size),  # type: ignore[attr-defined]
            "image_score": float(pixel_attr.double().sum()),
            **_patch_fields(adapter, pixel_attr.numpy()),
        }
    total = sum(token_scores) + fields.get("image_score", 0.0)
    return Attribution(
        request=request.text,
        tokens=reference.pieces["request"],
        token_scores=token_scores,
        signal=at_input,
        baseline_signal=at_baseline,
        convergence_delta=float(total - (at_input - at_baseline)),
        steps=settings.steps,
        **settings.target.record_fields(),
        **fields,
    )
