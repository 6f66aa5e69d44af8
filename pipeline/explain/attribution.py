"""Where the harmful-intent signal comes from: integrated gradients of ``||h_m - h_b||``.

The signal is the norm of ``delta_h = h_m - h_b``, the difference between the last-token states
of the malicious and the benign framing at the fusion layer. Integrated gradients (captum)
attribute it to the request's own token embeddings and to the image:

- Text: the request's token embeddings are one input, spliced into *both* framed prompts, so a
  token's attribution is its effect on the contrast, not on either prompt alone. Baseline: zero
  embeddings.
- Embedded default model (SmolLM2 + OCR): the image reaches the model only as OCR text, so the
  OCR text's tokens are a second input (baseline zero embeddings). Each OCR word's score is the
  sum over the tokens that start in it, each line's the sum over its tokens; the image map
  colours each word's box in the picture by its score.
- Hugging Face VLMs (LLaVA): the image's ``pixel_values`` are a second input. Baseline: a black
  image passed through the model's own image processor, so it is black *before* normalisation
  (``(0 - mean) / std`` per channel in normalised space, not zeros there). The saliency map is
  ``|attribution|`` summed over channels; the signed attribution is also summed per patch of
  the vision encoder's grid, the units the encoder actually sees.

The path integral is cut in two (see :func:`_integrate`) so that the sharp start of the path
from zero embeddings gets its share of interpolation points; the result is still plain
integrated gradients along the straight path.

Tokens are located by character offsets in the prompt each adapter renders itself, so the
token ids, and therefore the signal, are exactly those of the adapter's own forward pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from captum.attr import IntegratedGradients
from PIL import Image
from torch import nn
from transformers import DynamicCache

from pipeline.config import PLACEHOLDER, ContrastivePrompts
from pipeline.data.images import load_image
from pipeline.models.base import ModelAdapter, Request, check_layers
from pipeline.models.embedded import IMAGE_CLOSE, IMAGE_OPEN, EmbeddedAdapter
from pipeline.models.hf_vlm import HFVisionLanguageAdapter
from pipeline.models.hooks import run_to_layers
from pipeline.models.ocr import OCRResult, line_words, word_spans

ImageKind = Literal["ocr_lines", "pixels"]
Span = tuple[int, int]  # [start, stop) in tokens or characters
Box = tuple[float, float, float, float]  # left, top, right, bottom in image pixels

# Interpolation points per backward pass: bounds activation memory, not the result.
DEFAULT_INTERNAL_BATCH = 8
NO_LINE = -1  # an OCR token (the newline between lines) that belongs to no line
NO_WORD = -1  # an OCR token (a newline, a lone space) that belongs to no word
TOP_PATCHES = 5  # patches listed in the JSON summary
CMAP = "coolwarm"  # red raises the intent signal, blue lowers it
# Where the integration path is cut (fractions of the way from baseline to input); see _integrate.
PATH_SEGMENTS: tuple[float, ...] = (0.0, 0.1, 1.0)


@dataclass(frozen=True)
class Attribution:
    """Integrated-gradients attribution of one request's harmful-intent signal.

    Scores are signed: positive raises ``||delta_h||``. ``image_score`` is the image's share: the
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
    fusion_layer: int
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


# ---------------------------------------------------------------------------------------------
# Pure helpers: spans, token pieces, OCR lines, image regions.


def overlapping_tokens(offsets: Sequence[tuple[int, int]], start: int, stop: int) -> Span:
    """Token index range ``[first, last + 1)`` of the tokens whose characters overlap ``[start, stop)``.

    Special tokens carry empty ``(0, 0)`` offsets and never overlap.
    """
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < stop and e > start]
    if not hits:
        raise ValueError(f"no token covers characters [{start}, {stop})")
    if hits != list(range(hits[0], hits[-1] + 1)):
        raise ValueError(f"tokens covering characters [{start}, {stop}) are not contiguous")
    return hits[0], hits[-1] + 1


def token_pieces(text: str, offsets: Sequence[tuple[int, int]], start: int, stop: int) -> list[str]:
    """The text each token of a span stands for, clipped to ``[start, stop)``.

    Each piece runs from the previous token's end to its own end, so a space between words goes
    with the word after it (as byte-level BPE spells it) whether or not the tokenizer trims
    offsets, and the pieces join back to ``text[start:stop]``.
    """
    ends = [min(e, stop) for _, e in offsets]
    ends[-1] = stop
    starts = [start] + ends[:-1]
    return [text[a:b] for a, b in zip(starts, ends, strict=True)]


def line_char_ranges(lines: Sequence[str]) -> list[Span]:
    """Character range of each line inside ``"\\n".join(lines)``."""
    ranges: list[Span] = []
    cursor = 0
    for line in lines:
        ranges.append((cursor, cursor + len(line)))
        cursor += len(line) + 1
    return ranges


def assign_lines(pieces: Sequence[str], piece_starts: Sequence[int], ranges: Sequence[Span]) -> list[int]:
    """OCR line of each token: the line holding its first non-blank character, else :data:`NO_LINE`.

    Works for any character ranges: given word ranges it gives each token's word.
    """
    assigned: list[int] = []
    for piece, start in zip(pieces, piece_starts, strict=True):
        stripped = len(piece) - len(piece.lstrip())
        if stripped == len(piece):
            assigned.append(NO_LINE)
            continue
        char = start + stripped
        line = next((i for i, (a, b) in enumerate(ranges) if a <= char < b), NO_LINE)
        assigned.append(line)
    return assigned


def sum_by_line(scores: Sequence[float], lines: Sequence[int], n_lines: int) -> list[float]:
    """Summed token scores per OCR line."""
    totals = [0.0] * n_lines
    for score, line in zip(scores, lines, strict=True):
        if line != NO_LINE:
            totals[line] += float(score)
    return totals


def word_char_ranges(lines: Sequence[Sequence[Span]], line_ranges: Sequence[Span]) -> tuple[list[Span], list[int]]:
    """Character range of every word inside the joined OCR text, and the line it is on.

    ``lines[i]`` holds line ``i``'s word ranges relative to the line's start; ``line_ranges``
    where each line sits in the joined text (:func:`line_char_ranges`).
    """
    ranges: list[Span] = []
    owners: list[int] = []
    for line, (words, (offset, _)) in enumerate(zip(lines, line_ranges, strict=True)):
        for start, stop in words:
            ranges.append((offset + start, offset + stop))
            owners.append(line)
    return ranges, owners


def sum_by_word(
    scores: Sequence[float], pieces: Sequence[str], piece_starts: Sequence[int], word_ranges: Sequence[Span]
) -> tuple[list[float], list[int]]:
    """Summed token scores per OCR word, and each token's word.

    A token counts for the word holding its first non-blank character, so a leading space goes
    with the word after it; tokens of blanks only (newlines) count for no word (:data:`NO_WORD`).
    """
    owners = assign_lines(pieces, piece_starts, word_ranges)
    return sum_by_line(scores, owners, len(word_ranges)), owners


def patch_grid(attribution: np.ndarray, patch_size: int) -> np.ndarray:
    """Signed attribution summed over channels and pixels of each ``patch_size`` square: rows x cols.

    ``attribution`` is ``(channels, height, width)``. A vision encoder's patch embedding drops
    pixels past the last whole patch, so they have zero attribution and the grid ignores them.
    """
    if attribution.ndim != 3:
        raise ValueError(f"pixel attribution must be (channels, height, width), got shape {attribution.shape}")
    if patch_size < 1:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    channels, height, width = attribution.shape
    rows, cols = height // patch_size, width // patch_size
    if rows == 0 or cols == 0:
        raise ValueError(f"a {height} x {width} image has no whole {patch_size}-pixel patch")
    whole = attribution[:, : rows * patch_size, : cols * patch_size].astype(np.float64)
    return whole.reshape(channels, rows, patch_size, cols, patch_size).sum(axis=(0, 2, 4))


def patch_boxes(grid: tuple[int, int], region: Box) -> list[list[Box]]:
    """Each patch's box in original-image pixels, the grid laid evenly over ``region``.

    Exact when the processed image is a whole number of patches, as CLIP-style processors make it.
    """
    rows, cols = grid
    left, top, right, bottom = region
    width, height = (right - left) / cols, (bottom - top) / rows
    return [
        [(left + c * width, top + r * height, left + (c + 1) * width, top + (r + 1) * height) for c in range(cols)]
        for r in range(rows)
    ]


def top_indices(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` largest scores by magnitude, largest first; ties keep reading order."""
    return sorted(range(len(scores)), key=lambda i: (-abs(scores[i]), i))[:k]


def crop_region(image_processor: Any, size: tuple[int, int]) -> Box:
    """The part of the original image the processor's pixels cover, in original pixels.

    CLIP-style processors resize the shortest edge and centre-crop, so the saliency map covers a
    centred square, not the whole picture; processors that resize to a fixed size cover it all.
    """
    width, height = size
    resize = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    if not (getattr(image_processor, "do_center_crop", False) and "shortest_edge" in resize and crop):
        return (0.0, 0.0, float(width), float(height))
    scale = resize["shortest_edge"] / min(width, height)
    crop_w, crop_h = crop["width"] / scale, crop["height"] / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


def locate_request(prompt: str, framed: str, template: str, request: str) -> Span:
    """Character range of ``request`` inside ``prompt``, where the framed text put it.

    The framed text is the last thing in the user turn, so its last occurrence is the right one
    even when the image's OCR text repeats the request (typography attacks do).
    """
    at = prompt.rfind(framed)
    if at < 0:
        raise ValueError(f"the chat template changed the framed request text, so it cannot be located: {framed!r}")
    start = at + template.index(PLACEHOLDER)
    return start, start + len(request)


def locate_ocr_text(prompt: str, ocr_text: str) -> Span:
    """Character range of the OCR text inside the embedded model's prompt."""
    block = f"{IMAGE_OPEN}\n{ocr_text}\n{IMAGE_CLOSE}"
    at = prompt.find(block)
    if at < 0:
        raise ValueError("the image's OCR text is not where the embedded adapter puts it")
    start = at + len(IMAGE_OPEN) + 1
    return start, start + len(ocr_text)


def safe_name(value: object) -> str:
    """A file-name-safe form of a row id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value))


# ---------------------------------------------------------------------------------------------
# The differentiable signal.


def splice(base: torch.Tensor, parts: Sequence[tuple[Span, torch.Tensor]]) -> torch.Tensor:
    """``base`` embeddings ``(L, H)`` with ``(S, n, H)`` blocks written over token spans; returns ``(S, L, H)``."""
    steps = parts[0][1].shape[0]
    pieces: list[torch.Tensor] = []
    cursor = 0
    for (start, stop), block in sorted(parts, key=lambda part: part[0][0]):
        pieces.append(base[cursor:start].expand(steps, -1, -1))
        pieces.append(block.to(base.dtype))
        cursor = stop
    pieces.append(base[cursor:].expand(steps, -1, -1))
    return torch.cat(pieces, dim=1)


def shared_prefix_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common start of two token-id lists, at most ``limit``."""
    n = 0
    for x, y in zip(a[:limit], b[:limit], strict=True):
        if x != y:
            break
        n += 1
    return n


class FusionRunner:
    """Runs a decoder up to the fusion block on given input embeddings and returns last-token states.

    Tokens before every attributed input (system prompt, chat header, the templates' common start)
    are the same in both framings and at every interpolation step, so their keys and values are
    computed once, without gradients, and reused: the forward then covers only the tail.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, layer: int, prefix_ids: Sequence[int]) -> None:
        self.model = model
        self.blocks = blocks
        self.layer = layer
        self.prefix_len = len(prefix_ids)
        self.prefix_kv = self._prefix_kv(list(prefix_ids)) if prefix_ids else []

    def _prefix_kv(self, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        device = next(self.model.parameters()).device
        cache = DynamicCache()
        ids = torch.tensor([prefix_ids], device=device)
        with torch.no_grad():
            # Only blocks up to the fusion layer ever read the cache; the early stop skips the rest.
            run_to_layers(
                lambda: self.model(input_ids=ids, past_key_values=cache, use_cache=True),
                self.blocks,
                [self.layer],
                torch.ones_like(ids),
            )
        return [(cache.layers[k].keys, cache.layers[k].values) for k in range(self.layer + 1)]

    def states(self, embeds: torch.Tensor, **extra: Any) -> torch.Tensor:
        """Fusion-layer last-token states ``(S, hidden)`` float32 for full-prompt embeddings ``(S, L, H)``.

        The early stop raises from a hook after the state is captured; the autograd graph up to
        that block is intact, so gradients flow back to the inputs.
        """
        steps = embeds.shape[0]
        tail = embeds[:, self.prefix_len :]
        if self.prefix_kv:
            # A fresh cache per call: the forward appends the tail's keys and values to it.
            extra["past_key_values"] = DynamicCache(
                [(k.expand(steps, -1, -1, -1), v.expand(steps, -1, -1, -1)) for k, v in self.prefix_kv]
            )
        mask = torch.ones(steps, tail.shape[1], dtype=torch.long)
        forward = lambda: self.model(inputs_embeds=tail, use_cache=bool(self.prefix_kv), **extra)  # noqa: E731
        return run_to_layers(forward, self.blocks, [self.layer], mask)[:, 0]


@dataclass(frozen=True)
class _Framing:
    """One framed prompt, tokenised as its adapter does, with where the attributed spans sit.

    ``pieces[name]`` is the text each token of span ``name`` stands for and ``starts[name]`` where
    each piece starts, relative to the span's first character.
    """

    input_ids: list[int]
    embeds: torch.Tensor  # (L, H), detached
    spans: dict[str, Span]
    pieces: dict[str, list[str]]
    starts: dict[str, list[int]]


def _framing(
    adapter_model: nn.Module, ids: list[int], prompt: str, offsets: list[tuple[int, int]], chars: dict[str, Span]
) -> _Framing:
    """A :class:`_Framing` from a prompt's token ids, the offsets of its text tokens and character spans."""
    spans: dict[str, Span] = {}
    pieces: dict[str, list[str]] = {}
    starts: dict[str, list[int]] = {}
    for name, (start, stop) in chars.items():
        first, last = overlapping_tokens(offsets, start, stop)
        spans[name] = (first, last)
        pieces[name] = token_pieces(prompt, offsets[first:last], start, stop)
        starts[name] = [0] + [min(e, stop) - start for _, e in offsets[first : last - 1]]
    device = next(adapter_model.parameters()).device
    with torch.no_grad():
        embeds = adapter_model.get_input_embeddings()(torch.tensor([ids], device=device))[0].detach()
    return _Framing(ids, embeds, spans, pieces, starts)


def _check_same_tokens(benign: _Framing, malicious: _Framing, name: str) -> None:
    """The shared input only makes sense if both framings tokenise the span identically."""
    ids_b = benign.input_ids[slice(*benign.spans[name])]
    ids_m = malicious.input_ids[slice(*malicious.spans[name])]
    if ids_b != ids_m:
        raise ValueError(
            f"the {name} tokenises differently under the two templates; put the same separator before "
            f"{PLACEHOLDER} in both"
        )


def _contrast(
    runner: FusionRunner, benign: _Framing, malicious: _Framing, names: Sequence[str], with_pixels: bool
) -> Callable[..., torch.Tensor]:
    """``f(span embeddings..., [pixel_values]) = ||h_m - h_b||``, the same inputs spliced into both framings."""

    def states(framing: _Framing, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        # inputs are the span embeddings in ``names`` order, then pixel_values when present.
        spans = [(framing.spans[n], x) for n, x in zip(names, inputs[: len(names)], strict=True)]
        embeds = splice(framing.embeds, spans)
        extra = {"pixel_values": inputs[len(names)]} if with_pixels else {}
        return runner.states(embeds, **extra)

    def signal(*inputs: torch.Tensor) -> torch.Tensor:
        return (states(malicious, inputs) - states(benign, inputs)).norm(dim=-1)

    return signal


def _runner(
    model: nn.Module, blocks: nn.ModuleList, layer: int, benign: _Framing, malicious: _Framing, limit: int
) -> FusionRunner:
    """A runner caching the framings' common start, up to the first attributed token."""
    first_input = min([limit] + [start for start, _ in (*benign.spans.values(), *malicious.spans.values())])
    length = shared_prefix_length(benign.input_ids, malicious.input_ids, first_input)
    return FusionRunner(model, blocks, layer, benign.input_ids[:length])


def split_steps(steps: int, pieces: int) -> list[int]:
    """``steps`` interpolation points shared as evenly as possible over ``pieces`` segments."""
    return [steps // pieces + (1 if i < steps % pieces else 0) for i in range(pieces)]


def _integrate(
    signal: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    baselines: tuple[torch.Tensor, ...],
    steps: int,
    internal_batch_size: int,
    segments: Sequence[float] = PATH_SEGMENTS,
) -> tuple[tuple[torch.Tensor, ...], float, float]:
    """IG attributions per input, plus the signal at the input and at the baseline.

    The straight path from baseline to input is integrated piecewise, each piece with its own
    Gauss-Legendre points. By additivity of the path integral the sum over pieces is exactly
    integrated gradients over the whole path; the cut only puts more points where the integrand
    changes fast. It does near a zero-embedding baseline: RMSNorm rescales a scaled embedding
    back to full size once ``alpha * rms(x)`` exceeds ``sqrt(eps)``, so on SmolLM2 the signal rises
    by a quarter and falls again within the first tenth of the path. With 64 points on OCR
    requests, cutting at 0.1 shrank the share of the signal change left unaccounted for from
    9-20% to about 1%.
    """
    with torch.no_grad():
        at_input = float(signal(*inputs)[0])
        at_baseline = float(signal(*baselines)[0])
    ig = IntegratedGradients(signal)
    totals = [torch.zeros_like(x, dtype=torch.float32, device="cpu") for x in inputs]
    bounds = list(zip(segments[:-1], segments[1:], strict=True))
    for (lo, hi), n in zip(bounds, split_steps(steps, len(bounds)), strict=True):
        start = tuple(b + lo * (x - b) for x, b in zip(inputs, baselines, strict=True))
        stop = tuple(b + hi * (x - b) for x, b in zip(inputs, baselines, strict=True))
        attributions = ig.attribute(stop, baselines=start, n_steps=n, internal_batch_size=internal_batch_size)
        for total, a in zip(totals, attributions, strict=True):
            total += a.detach().float().cpu()
    return tuple(t[0] for t in totals), at_input, at_baseline


# ---------------------------------------------------------------------------------------------
# Embedded default model: SmolLM2 reading the image through OCR.


class _FixedReader:
    """Stands in for the OCR reader so the prompt is built from one reading of the image."""

    def __init__(self, result: OCRResult) -> None:
        self.result = result

    def read(self, path: Path) -> OCRResult:
        return self.result


def _embedded_framing(adapter: EmbeddedAdapter, request: Request, template: str, ocr: OCRResult | None) -> _Framing:
    """Tokenise one framing as the adapter does; spans for the request and, if any, the OCR text."""
    framed = template.replace(PLACEHOLDER, request.text)
    prompt = adapter.prompt_text(Request(framed, request.image))
    chars = {"request": locate_request(prompt, framed, template, request.text)}
    if ocr is not None and ocr.lines:
        chars["ocr"] = locate_ocr_text(prompt, ocr.text)
    # The adapter tokenises the rendered prompt without extra special tokens; so do we.
    encoded = adapter.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    return _framing(adapter.model, list(encoded["input_ids"]), prompt, offsets, chars)


def _ocr_fields(ocr: OCRResult, framing: _Framing | None, scores: list[float]) -> dict[str, Any]:
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


def _embedded_attribution(
    adapter: EmbeddedAdapter,
    request: Request,
    prompts: ContrastivePrompts,
    fusion_layer: int,
    steps: int,
    internal_batch_size: int,
) -> Attribution:
    """IG over the request tokens and the OCR text tokens; OCR lines scored by their tokens."""
    ocr = adapter.reader.read(Path(request.image)) if request.image is not None else None
    # One OCR reading serves both framings (without an OCR cache the reader would run again).
    reader = _FixedReader(ocr) if ocr is not None else adapter.reader
    view = EmbeddedAdapter(adapter.model, adapter.tokenizer, reader, adapter.info)  # type: ignore[arg-type]
    benign = _embedded_framing(view, request, prompts.benign, ocr)
    malicious = _embedded_framing(view, request, prompts.malicious, ocr)
    names = list(benign.spans)  # "request", then "ocr" when the image has text
    for name in names:
        _check_same_tokens(benign, malicious, name)
    base = adapter.model.model
    runner = _runner(base, base.layers, fusion_layer, benign, malicious, len(benign.input_ids))
    signal = _contrast(runner, benign, malicious, names, with_pixels=False)
    inputs = tuple(benign.embeds[slice(*benign.spans[n])].unsqueeze(0) for n in names)
    baselines = tuple(torch.zeros_like(x) for x in inputs)
    attributions, at_input, at_baseline = _integrate(signal, inputs, baselines, steps, internal_batch_size)
    scores = {n: a.sum(dim=-1).tolist() for n, a in zip(names, attributions, strict=True)}

    fields = {} if ocr is None else _ocr_fields(ocr, benign if "ocr" in names else None, scores.get("ocr", []))
    total = sum(sum(v) for v in scores.values())
    return Attribution(
        request=request.text,
        tokens=benign.pieces["request"],
        token_scores=scores["request"],
        signal=at_input,
        baseline_signal=at_baseline,
        convergence_delta=float(total - (at_input - at_baseline)),
        fusion_layer=fusion_layer,
        steps=steps,
        **fields,
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face VLMs (LLaVA): request tokens and pixels.


def _hf_framing(
    adapter: HFVisionLanguageAdapter, request: Request, template: str
) -> tuple[_Framing, torch.Tensor | None]:
    """Tokenise one framing exactly as the adapter does; return it and its ``pixel_values``.

    The processor expands ``<image>`` into many tokens, which shifts every later position; the
    request sits after the image, so its span is found in the unexpanded text and counted from
    the end.
    """
    framed = template.replace(PLACEHOLDER, request.text)
    framed_request = Request(framed, request.image)
    prompt = adapter.prompt_text(framed_request)
    chars = locate_request(prompt, framed, template, request.text)
    text = adapter.tokenizer(prompt, return_offsets_mapping=True)
    text_offsets = [(int(a), int(b)) for a, b in text["offset_mapping"]]
    batch = adapter.encode([framed_request])
    ids = batch["input_ids"][0].tolist()
    # Map text-token positions to positions in the expanded ids by their distance from the end.
    shift = len(ids) - len(text_offsets)
    offsets = [(0, 0)] * shift + text_offsets if shift >= 0 else text_offsets[-shift:]
    framing = _framing(adapter.model, ids, prompt, offsets, {"request": chars})
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


def _hf_attribution(
    adapter: HFVisionLanguageAdapter,
    request: Request,
    prompts: ContrastivePrompts,
    fusion_layer: int,
    steps: int,
    internal_batch_size: int,
) -> Attribution:
    """IG over the request tokens and, with an image, over its pixels."""
    benign, pixels = _hf_framing(adapter, request, prompts.benign)
    malicious, _ = _hf_framing(adapter, request, prompts.malicious)
    _check_same_tokens(benign, malicious, "request")
    with_pixels = pixels is not None and request.image is not None
    limit = _first_image_token(adapter, benign.input_ids)
    runner = _runner(adapter.model, adapter.blocks, fusion_layer, benign, malicious, limit)
    signal = _contrast(runner, benign, malicious, ["request"], with_pixels)

    words = benign.embeds[slice(*benign.spans["request"])].unsqueeze(0)
    inputs: tuple[torch.Tensor, ...] = (words,)
    baselines: tuple[torch.Tensor, ...] = (torch.zeros_like(words),)
    fields: dict[str, Any] = {}
    if with_pixels:
        assert pixels is not None and request.image is not None
        size = load_image(request.image).size
        inputs += (pixels,)
        baselines += (black_pixels(adapter, size),)
    attributions, at_input, at_baseline = _integrate(signal, inputs, baselines, steps, internal_batch_size)
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
        tokens=benign.pieces["request"],
        token_scores=token_scores,
        signal=at_input,
        baseline_signal=at_baseline,
        convergence_delta=float(total - (at_input - at_baseline)),
        fusion_layer=fusion_layer,
        steps=steps,
        **fields,
    )


# ---------------------------------------------------------------------------------------------
# Entry point and serialisation.


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
        run = _embedded_attribution
    elif isinstance(adapter, HFVisionLanguageAdapter):
        run = _hf_attribution  # type: ignore[assignment]
    else:
        raise TypeError(f"no attribution for adapter type {type(adapter).__name__}")
    # Gradients are taken w.r.t. the inputs only; the model's weights stay frozen.
    with torch.enable_grad():
        return run(adapter, request, prompts, fusion_layer, steps, internal_batch_size)  # type: ignore[arg-type]


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
        "fusion_layer": a.fusion_layer,
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
