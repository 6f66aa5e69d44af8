"""Attribution on the embedded default model (SmolLM2 + OCR): request tokens and OCR text tokens.

The image reaches the model only as OCR text, so the OCR text's tokens are a second input
(baseline zero embeddings). Each OCR word's score is the sum over the tokens that start in it,
each line's the sum over its tokens; the image map colours each word's box in the picture by
its score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ContrastivePrompts
from pipeline.explain.integrated import Framing, IGSettings, frame, integrate_framings
from pipeline.explain.record import Attribution
from pipeline.explain.spans import (
    assign_lines,
    line_char_ranges,
    locate_ocr_text,
    locate_request,
    sum_by_line,
    sum_by_word,
    word_char_ranges,
)
from pipeline.models.base import Request
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.ocr import OCRResult, line_words, word_spans


class _FixedReader:
    """Stands in for the OCR reader so the prompt is built from one reading of the image."""

    def __init__(self, result: OCRResult) -> None:
        self.result = result

    def read(self, path: Path) -> OCRResult:
        return self.result


def _embedded_framing(
    adapter: EmbeddedAdapter, request: Request, prompts: ContrastivePrompts, name: str, ocr: OCRResult | None
) -> Framing:
    """Tokenise framing ``name`` as the adapter does; spans for the request and, if any, the OCR text."""
    framed = prompts.framed(name, request.text)
    prompt = adapter.prompt_text(Request(framed, request.image))
    chars = {"request": locate_request(prompt, framed, prompts.request_offset(name), request.text)}
    if ocr is not None and ocr.lines:
        chars["ocr"] = locate_ocr_text(prompt, ocr.text)
    # The adapter tokenises the rendered prompt without extra special tokens; so do we.
    encoded = adapter.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    return frame(adapter.model, list(encoded["input_ids"]), prompt, offsets, chars)


def _ocr_fields(ocr: OCRResult, framing: Framing | None, scores: list[float]) -> dict[str, Any]:
    """The OCR part of an :class:`Attribution`: token scores, each token's line and word, line and word totals."""
    texts = [line.text for line in ocr.lines]
    words = [line_words(line) for line in ocr.lines]
    fields: dict[str, Any] = {
        "image_kind": "ocr_lines",
        "line_texts": texts,
        "line_boxes": [[[float(x), float(y)] for x, y in line.box] for line in ocr.lines],
        "line_scores": [0.0] * len(texts),
        "word_texts": [word.text for line in words for word in line],
        "word_boxes": [[[float(x), float(y)] for x, y in word.box] for line in words for word in line],
        "word_scores": [0.0] * sum(len(line) for line in words),
        "word_lines": [i for i, line in enumerate(words) for _ in line],
    }
    if framing is not None:
        tokens, starts = framing.pieces["ocr"], framing.starts["ocr"]
        line_ranges = line_char_ranges(texts)
        lines = assign_lines(tokens, starts, line_ranges)
        # Word ranges come from the line text itself, so they match the tokens even where the
        # engine's word boxes were replaced by boxes cut from the line's.
        word_ranges, _ = word_char_ranges([word_spans(text) for text in texts], line_ranges)
        per_word, token_words = sum_by_word(scores, tokens, starts, word_ranges)
        fields.update(
            ocr_tokens=tokens,
            ocr_token_scores=scores,
            ocr_token_lines=lines,
            ocr_token_words=token_words,
            line_scores=sum_by_line(scores, lines, len(texts)),
            word_scores=per_word,
            image_score=float(sum(scores)),
        )
    return fields


def embedded_framings(
    adapter: EmbeddedAdapter, request: Request, prompts: ContrastivePrompts, variants: Sequence[str]
) -> tuple[OCRResult | None, dict[str, Framing]]:
    """The image's OCR reading (None without an image) and one :class:`Framing` per variant, read once."""
    ocr = adapter.reader.read(Path(request.image)) if request.image is not None else None
    # One OCR reading serves every framing (without an OCR cache the reader would run again).
    reader = _FixedReader(ocr) if ocr is not None else adapter.reader
    view = EmbeddedAdapter(model=adapter.model, tokenizer=adapter.tokenizer, reader=reader, info=adapter.info)  # type: ignore[arg-type]
    return ocr, {v: _embedded_framing(view, request, prompts, v, ocr) for v in variants}


def embedded_attribution(
    adapter: EmbeddedAdapter,
    request: Request,
    prompts: ContrastivePrompts,
    settings: IGSettings,
) -> Attribution:
    """IG over the request tokens and the OCR text tokens; OCR lines scored by their tokens."""
    variants = settings.target.variants
    ocr, framings = embedded_framings(adapter, request, prompts, variants)
    reference = framings[variants[0]]
    names = list(reference.spans)  # "request", then "ocr" when the image has text
    base = adapter.model.model
    limit = min(len(framing.input_ids) for framing in framings.values())
    attributions, at_input, at_baseline = integrate_framings(base, base.layers, framings, names, limit, settings)
    scores = {n: a.sum(dim=-1).tolist() for n, a in zip(names, attributions, strict=True)}

    fields = {} if ocr is None else _ocr_fields(ocr, reference if "ocr" in names else None, scores.get("ocr", []))
    total = sum(sum(v) for v in scores.values())
    return Attribution(
        request=request.text,
        tokens=reference.pieces["request"],
        token_scores=scores["request"],
        signal=at_input,
        baseline_signal=at_baseline,
        convergence_delta=float(total - (at_input - at_baseline)),
        steps=settings.steps,
        **settings.target.record_fields(),
        **fields,
    )
