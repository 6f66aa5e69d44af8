"""The attribution record of one request and its JSON summary."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.explain.patches import Box, patch_boxes, top_indices

ImageKind = Literal["ocr_lines", "pixels"]

TOP_PATCHES = 5  # patches listed in the JSON summary


@dataclass(frozen=True, kw_only=True)
class Attribution:
    """Integrated-gradients attribution of one request's score.

    ``target`` says what was attributed (:mod:`pipeline.explain.targets`): ``detector``, the
    shipped detector's logit, or ``contrast``, ``||delta_h||`` at the fusion layer;
    ``target_label`` says it in words, ``detector`` describes the guard's detector and ``layers``
    are the blocks the target reads. ``signal`` is the target's value for the request.

    Scores are signed: positive raises the target. ``image_score`` is the image's share: the
    sum over its OCR tokens or its pixels. Completeness says that request tokens plus image sum to
    ``signal - baseline_signal`` up to the integral's discretisation error, ``convergence_delta``.

    OCR images carry per-token, per-word and per-line scores (``ocr_token_words`` and
    ``word_lines`` say which word a token belongs to and which line a word is on). Pixel images
    carry ``pixel_map`` (``|attribution|`` per processed pixel) and, when the pixels form one
    image, ``patch_scores``: the signed attribution summed over each ``patch_size`` square of
    the vision encoder's grid, rows x cols, summing to ``image_score``.
    """

    request: str
    tokens: list[str]
    token_scores: list[float]
    signal: float
    baseline_signal: float
    convergence_delta: float
    target: str
    target_label: str
    detector: str
    layers: list[int]
    steps: int
    image_kind: ImageKind | None = None
    ocr_tokens: list[str] = field(default_factory=list)
    ocr_token_scores: list[float] = field(default_factory=list)
    ocr_token_lines: list[int] = field(default_factory=list)
    line_texts: list[str] = field(default_factory=list)
    line_boxes: list[list[list[float]]] = field(default_factory=list)
    line_scores: list[float] = field(default_factory=list)
    ocr_token_words: list[int] = field(default_factory=list)
    word_texts: list[str] = field(default_factory=list)
    word_boxes: list[list[list[float]]] = field(default_factory=list)
    word_scores: list[float] = field(default_factory=list)
    word_lines: list[int] = field(default_factory=list)
    pixel_map: np.ndarray | None = None
    pixel_box: Box | None = None
    patch_scores: np.ndarray | None = None
    patch_size: int | None = None
    image_score: float = 0.0

    @property
    def total(self) -> float:
        """Sum of every attribution; completeness makes it ``signal - baseline_signal``."""
        return float(sum(self.token_scores) + self.image_score)


def _rounded(values: Sequence[float]) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


def attribution_to_json(a: Attribution) -> dict[str, Any]:
    """A JSON-ready summary: every token, OCR word and line score; pixels by map shape, region, peak and patches.

    ``ocr_words`` lists each word's text, box (4 x [x, y] in image pixels), score and line;
    ``patches`` the patch grid's size, every patch score and the strongest patches with their
    boxes in the original image.
    """
    out: dict[str, Any] = {
        "request": a.request,
        "target": a.target,
        "target_label": a.target_label,
        "detector": a.detector,
        "layers": a.layers,
        "steps": a.steps,
        "signal": a.signal,
        "baseline_signal": a.baseline_signal,
        "total_attribution": a.total,
        "convergence_delta": a.convergence_delta,
        "tokens": [{"token": t, "score": s} for t, s in zip(a.tokens, _rounded(a.token_scores), strict=True)],
        "image_kind": a.image_kind,
        "image_score": a.image_score,
    }
    if a.image_kind == "ocr_lines":
        out["ocr_lines"] = [
            {"text": t, "box": b, "score": s}
            for t, b, s in zip(a.line_texts, a.line_boxes, _rounded(a.line_scores), strict=True)
        ]
        out["ocr_words"] = [
            {"text": t, "box": b, "score": s, "line": line}
            for t, b, s, line in zip(a.word_texts, a.word_boxes, _rounded(a.word_scores), a.word_lines, strict=True)
        ]
        out["ocr_tokens"] = [
            {"token": t, "score": s, "line": line}
            for t, s, line in zip(a.ocr_tokens, _rounded(a.ocr_token_scores), a.ocr_token_lines, strict=True)
        ]
    if a.pixel_map is not None:
        row, col = np.unravel_index(int(np.argmax(a.pixel_map)), a.pixel_map.shape)
        out["pixels"] = {
            "map_shape": list(a.pixel_map.shape),
            "box": list(a.pixel_box) if a.pixel_box else None,
            "abs_total": float(a.pixel_map.sum()),
            "peak": {"row": int(row), "col": int(col), "value": float(a.pixel_map[row, col])},
        }
    if a.patch_scores is not None:
        out["patches"] = _patches_json(a.patch_scores, a.patch_size, a.pixel_box)
    return out


def _patches_json(scores: np.ndarray, patch_size: int | None, region: Box | None) -> dict[str, Any]:
    """The patch grid's scores, and the strongest patches with their boxes in the original image."""
    rows, cols = scores.shape
    flat = scores.ravel().tolist()
    boxes = patch_boxes((rows, cols), region) if region is not None else None
    top = []
    for i in top_indices(flat, TOP_PATCHES):
        row, col = divmod(i, cols)
        box = [float(f"{v:.6g}") for v in boxes[row][col]] if boxes is not None else None
        top.append({"row": row, "col": col, "score": float(f"{flat[i]:.6g}"), "box": box})
    return {
        "grid": [rows, cols],
        "patch_size": patch_size,
        "scores": [_rounded(row) for row in scores.tolist()],
        "top": top,
    }


def safe_name(value: object) -> str:
    """A file-name-safe form of a row id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value))
