"""Where the harmful-intent signal comes from: integrated gradients of ``||h_m - h_b||``.

The signal is the norm of ``delta_h = h_m - h_b``, the difference between the last-token states
of the malicious and the benign framing at the fusion layer. Integrated gradients (captum)
attribute it to the request's own token embeddings and to the image:

- Text: the request's token embeddings are one input, spliced into *both* framed prompts, so a
  token's attribution is its effect on the contrast, not on either prompt alone. Baseline: zero
  embeddings.
- Embedded default model (SmolLM2 + OCR): the image reaches the model only as OCR text, so the
  OCR text's tokens are a second input (baseline zero embeddings) and each OCR line's score is
  the sum over its tokens; the image map colours each line's box by that score.
- Hugging Face VLMs (LLaVA): the image's ``pixel_values`` are a second input. Baseline: a black
  image passed through the model's own image processor, so it is black *before* normalisation
  (``(0 - mean) / std`` per channel in normalised space, not zeros there). The saliency map is
  ``|attribution|`` summed over channels.

Tokens are located by character offsets in the prompt each adapter renders itself, so the
token ids, and therefore the signal, are exactly those of the adapter's own forward pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from captum.attr import IntegratedGradients  # noqa: E402
from matplotlib.colors import Normalize, TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Polygon, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.images import load_image  # noqa: E402
from pipeline.models.base import ModelAdapter, Request, check_layers  # noqa: E402
from pipeline.models.embedded import IMAGE_CLOSE, IMAGE_OPEN, EmbeddedAdapter  # noqa: E402
from pipeline.models.hf_vlm import HFVisionLanguageAdapter  # noqa: E402
from pipeline.models.hooks import run_to_layers  # noqa: E402
from pipeline.models.ocr import OCRResult  # noqa: E402
from pipeline.prompts import PLACEHOLDER, ContrastivePrompts  # noqa: E402

ImageKind = Literal["ocr_lines", "pixels"]
Span = tuple[int, int]  # [start, stop) in tokens or characters
Box = tuple[float, float, float, float]  # left, top, right, bottom in image pixels

# Interpolation points per backward pass: bounds activation memory, not the result.
DEFAULT_INTERNAL_BATCH = 8
NO_LINE = -1  # an OCR token (the newline between lines) that belongs to no line
CMAP = "coolwarm"  # red raises the intent signal, blue lowers it


@dataclass(frozen=True)
class Attribution:
    """Integrated-gradients attribution of one request's harmful-intent signal.

    Scores are signed: positive raises ``||delta_h||``. Completeness says that the sum of all
    scores (request tokens, OCR tokens, pixels) equals ``signal - baseline_signal`` up to the
    integral's discretisation error, ``convergence_delta``.
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
    pixel_map: np.ndarray | None = None
    pixel_box: Box | None = None
    image_score: float = 0.0

    @property
    def total(self) -> float:
        """Sum of every attribution; completeness makes it ``signal - baseline_signal``."""
        return float(sum(self.token_scores) + sum(self.ocr_token_scores) + self.image_score)


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

    Each piece runs from its token's start to the next token's start, so leading spaces are kept
    however the tokenizer trims offsets, and the pieces join back to ``text[start:stop]``.
    """
    starts = [max(s, start) for s, _ in offsets]
    starts[0] = start
    ends = starts[1:] + [stop]
    return [text[a:b] for a, b in zip(starts, ends)]


def line_char_ranges(lines: Sequence[str]) -> list[Span]:
    """Character range of each line inside ``"\\n".join(lines)``."""
    ranges: list[Span] = []
    cursor = 0
    for line in lines:
        ranges.append((cursor, cursor + len(line)))
        cursor += len(line) + 1
    return ranges


def assign_lines(pieces: Sequence[str], piece_starts: Sequence[int], ranges: Sequence[Span]) -> list[int]:
    """OCR line of each token: the line holding its first non-blank character, else :data:`NO_LINE`."""
    assigned: list[int] = []
    for piece, start in zip(pieces, piece_starts):
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
    for score, line in zip(scores, lines):
        if line != NO_LINE:
            totals[line] += float(score)
    return totals


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


def fusion_state(forward: Callable[[], object], blocks: nn.ModuleList, layer: int, length: int, batch: int) -> torch.Tensor:
    """Last-token output of block ``layer``, ``(batch, hidden)`` float32, stopping the forward there.

    The early stop raises from a hook after the state is captured; the autograd graph up to that
    block is intact, so gradients flow back to the inputs.
    """
    mask = torch.ones(batch, length, dtype=torch.long)
    return run_to_layers(forward, blocks, [layer], mask)[:, 0]


@dataclass(frozen=True)
class _Framing:
    """One framed prompt: its token ids, input embeddings and where the attributed spans sit."""

    input_ids: list[int]
    embeds: torch.Tensor  # (L, H), detached
    spans: dict[str, Span]


def _check_same_tokens(benign: _Framing, malicious: _Framing, name: str) -> None:
    """The shared input only makes sense if both framings tokenise the span identically."""
    ids_b = benign.input_ids[slice(*benign.spans[name])]
    ids_m = malicious.input_ids[slice(*malicious.spans[name])]
    if ids_b != ids_m:
        raise ValueError(
            f"the {name} tokenises differently under the two templates; put the same separator before "
            f"{PLACEHOLDER} in both"
        )


def _integrate(
    signal: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    baselines: tuple[torch.Tensor, ...],
    steps: int,
    internal_batch_size: int,
) -> tuple[tuple[torch.Tensor, ...], float, float]:
    """IG attributions per input, plus the signal at the input and at the baseline."""
    with torch.no_grad():
        at_input = float(signal(*inputs)[0])
        at_baseline = float(signal(*baselines)[0])
    ig = IntegratedGradients(signal)
    attributions = ig.attribute(
        inputs, baselines=baselines, n_steps=steps, internal_batch_size=internal_batch_size
    )
    return tuple(a.detach().float().cpu()[0] for a in attributions), at_input, at_baseline


# ---------------------------------------------------------------------------------------------
# Embedded default model: SmolLM2 reading the image through OCR.


class _FixedReader:
    """Stands in for the OCR reader so the prompt is built from one reading of the image."""

    def __init__(self, result: OCRResult) -> None:
        self.result = result

    def read(self, path: Path) -> OCRResult:
        return self.result


def _embedded_framing(
    adapter: EmbeddedAdapter, request: Request, template: str, ocr: OCRResult | None
) -> tuple[_Framing, str, dict[str, Span]]:
    """Tokenise one framing; return it, its prompt, and the character spans of request and OCR text."""
    framed = template.replace(PLACEHOLDER, request.text)
    prompt = adapter.prompt_text(Request(framed, request.image))
    chars = {"request": locate_request(prompt, framed, template, request.text)}
    if ocr is not None and ocr.lines:
        chars["ocr"] = locate_ocr_text(prompt, ocr.text)
    # The adapter tokenises the rendered prompt without extra special tokens; so do we.
    encoded = adapter.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    spans = {name: overlapping_tokens(offsets, *span) for name, span in chars.items()}
    device = next(adapter.model.parameters()).device
    with torch.no_grad():
        embeds = adapter.model.get_input_embeddings()(torch.tensor([ids], device=device))[0].detach()
    return _Framing(ids, embeds, spans), prompt, chars


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
    view = EmbeddedAdapter(adapter.model, adapter.tokenizer, _FixedReader(ocr), adapter.info) if ocr else adapter
    benign, prompt, chars = _embedded_framing(view, request, prompts.benign, ocr)
    malicious, _, _ = _embedded_framing(view, request, prompts.malicious, ocr)
    names = list(benign.spans)  # "request" first, then "ocr" when the image has text
    for name in names:
        _check_same_tokens(benign, malicious, name)
    base = adapter.model.model
    blocks = base.layers

    def states(framing: _Framing, blocks_in: Sequence[torch.Tensor]) -> torch.Tensor:
        embeds = splice(framing.embeds, [(framing.spans[n], x) for n, x in zip(names, blocks_in)])
        return fusion_state(
            lambda: base(inputs_embeds=embeds, use_cache=False), blocks, fusion_layer, embeds.shape[1], embeds.shape[0]
        )

    def signal(*blocks_in: torch.Tensor) -> torch.Tensor:
        return (states(malicious, blocks_in) - states(benign, blocks_in)).norm(dim=-1)

    inputs = tuple(benign.embeds[slice(*benign.spans[n])].unsqueeze(0) for n in names)
    baselines = tuple(torch.zeros_like(x) for x in inputs)
    attributions, at_input, at_baseline = _integrate(signal, inputs, baselines, steps, internal_batch_size)
    scores = {n: a.sum(dim=-1).tolist() for n, a in zip(names, attributions)}

    encoded = adapter.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoded["offset_mapping"]]

    def pieces(name: str) -> tuple[list[str], list[int]]:
        span_offsets = offsets[slice(*benign.spans[name])]
        texts = token_pieces(prompt, span_offsets, *chars[name])
        starts = [max(s, chars[name][0]) for s, _ in span_offsets]
        starts[0] = chars[name][0]
        return texts, starts

    tokens, _ = pieces("request")
    result: dict[str, Any] = {}
    if ocr is not None:
        result["image_kind"] = "ocr_lines"
        result["line_texts"] = [line.text for line in ocr.lines]
        result["line_boxes"] = [[[float(x), float(y)] for x, y in line.box] for line in ocr.lines]
        result["line_scores"] = [0.0] * len(ocr.lines)
    if "ocr" in names:
        ocr_tokens, starts = pieces("ocr")
        relative = [s - chars["ocr"][0] for s in starts]
        lines = assign_lines(ocr_tokens, relative, line_char_ranges([line.text for line in ocr.lines]))
        result.update(
            ocr_tokens=ocr_tokens,
            ocr_token_scores=scores["ocr"],
            ocr_token_lines=lines,
            line_scores=sum_by_line(scores["ocr"], lines, len(ocr.lines)),
            image_score=float(sum(scores["ocr"])),
        )
    total = sum(sum(v) for v in scores.values())
    return Attribution(
        request=request.text,
        tokens=tokens,
        token_scores=scores["request"],
        signal=at_input,
        baseline_signal=at_baseline,
        convergence_delta=float(total - (at_input - at_baseline)),
        fusion_layer=fusion_layer,
        steps=steps,
        **result,
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face VLMs (LLaVA): request tokens and pixels.


def _hf_framing(
    adapter: HFVisionLanguageAdapter, request: Request, template: str
) -> tuple[_Framing, torch.Tensor | None, list[str]]:
    """Tokenise one framing exactly as the adapter does; return it, its pixels and the request's token pieces.

    The processor expands ``<image>`` into many tokens, which shifts every later position; the
    request sits after the image, so its span is found in the unexpanded text and counted from
    the end.
    """
    framed = template.replace(PLACEHOLDER, request.text)
    framed_request = Request(framed, request.image)
    prompt = adapter.prompt_text(framed_request)
    chars = locate_request(prompt, framed, template, request.text)
    text = adapter.tokenizer(prompt, return_offsets_mapping=True)
    offsets = [tuple(o) for o in text["offset_mapping"]]
    first, stop = overlapping_tokens(offsets, *chars)
    batch = adapter._encode([framed_request])
    ids = batch["input_ids"][0].tolist()
    from_end = len(offsets) - first
    span = (len(ids) - from_end, len(ids) - from_end + (stop - first))
    if ids[slice(*span)] != list(text["input_ids"][first:stop]):
        raise RuntimeError("the processor tokenised the request differently from the tokenizer alone")
    with torch.no_grad():
        embeds = adapter.model.get_input_embeddings()(batch["input_ids"])[0].detach()
    pixels = batch["pixel_values"] if "pixel_values" in batch else None
    pieces = token_pieces(prompt, offsets[first:stop], *chars)
    return _Framing(ids, embeds, {"request": span}), pixels, pieces


def black_pixels(adapter: HFVisionLanguageAdapter, size: tuple[int, int]) -> torch.Tensor:
    """``pixel_values`` of an all-black image of ``size``, through the model's own image processor."""
    black = Image.new("RGB", size, (0, 0, 0))
    values = adapter.processor.image_processor(images=[black], return_tensors="pt")["pixel_values"]  # type: ignore[attr-defined]
    return values.to(adapter.device, adapter.dtype)


def _hf_attribution(
    adapter: HFVisionLanguageAdapter,
    request: Request,
    prompts: ContrastivePrompts,
    fusion_layer: int,
    steps: int,
    internal_batch_size: int,
) -> Attribution:
    """IG over the request tokens and, with an image, over its pixels."""
    benign, pixels, tokens = _hf_framing(adapter, request, prompts.benign)
    malicious, _, _ = _hf_framing(adapter, request, prompts.malicious)
    _check_same_tokens(benign, malicious, "request")

    def states(framing: _Framing, words: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        embeds = splice(framing.embeds, [(framing.spans["request"], words)])
        extra = {} if image is None else {"pixel_values": image}
        return fusion_state(
            lambda: adapter.model(inputs_embeds=embeds, use_cache=False, **extra),
            adapter.blocks,
            fusion_layer,
            embeds.shape[1],
            embeds.shape[0],
        )

    def signal(words: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        return (states(malicious, words, image) - states(benign, words, image)).norm(dim=-1)

    words = benign.embeds[slice(*benign.spans["request"])].unsqueeze(0)
    inputs: tuple[torch.Tensor, ...] = (words,)
    baselines: tuple[torch.Tensor, ...] = (torch.zeros_like(words),)
    size: tuple[int, int] | None = None
    if pixels is not None and request.image is not None:
        size = load_image(request.image).size
        inputs += (pixels,)
        baselines += (black_pixels(adapter, size),)
    attributions, at_input, at_baseline = _integrate(signal, inputs, baselines, steps, internal_batch_size)
    token_scores = attributions[0].sum(dim=-1).tolist()
    result: dict[str, Any] = {}
    if size is not None:
        pixel_attr = attributions[1]  # (channels, height, width)
        result = {
            "image_kind": "pixels",
            "pixel_map": pixel_attr.abs().sum(dim=0).numpy().astype(np.float32),
            "pixel_box": crop_region(adapter.processor.image_processor, size),  # type: ignore[attr-defined]
            "image_score": float(pixel_attr.sum()),
        }
    total = sum(token_scores) + result.get("image_score", 0.0)
    return Attribution(
        request=request.text,
        tokens=tokens,
        token_scores=token_scores,
        signal=at_input,
        baseline_signal=at_baseline,
        convergence_delta=float(total - (at_input - at_baseline)),
        fusion_layer=fusion_layer,
        steps=steps,
        **result,
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
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
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
    """A JSON-ready summary: every token and OCR line score; the pixel map by shape, region and peak."""
    out: dict[str, Any] = {
        "request": a.request,
        "fusion_layer": a.fusion_layer,
        "steps": a.steps,
        "signal": a.signal,
        "baseline_signal": a.baseline_signal,
        "total_attribution": a.total,
        "convergence_delta": a.convergence_delta,
        "tokens": [{"token": t, "score": s} for t, s in zip(a.tokens, _rounded(a.token_scores))],
        "image_kind": a.image_kind,
        "image_score": a.image_score,
    }
    if a.image_kind == "ocr_lines":
        out["ocr_lines"] = [
            {"text": t, "box": b, "score": s} for t, b, s in zip(a.line_texts, a.line_boxes, _rounded(a.line_scores))
        ]
        out["ocr_tokens"] = [
            {"token": t, "score": s, "line": line}
            for t, s, line in zip(a.ocr_tokens, _rounded(a.ocr_token_scores), a.ocr_token_lines)
        ]
    if a.pixel_map is not None:
        row, col = np.unravel_index(int(np.argmax(a.pixel_map)), a.pixel_map.shape)
        out["pixels"] = {
            "map_shape": list(a.pixel_map.shape),
            "box": list(a.pixel_box) if a.pixel_box else None,
            "abs_total": float(a.pixel_map.sum()),
            "peak": {"row": int(row), "col": int(col), "value": float(a.pixel_map[row, col])},
        }
    return out


# ---------------------------------------------------------------------------------------------
# Figures.


def _symmetric_norm(scores: Sequence[float]) -> Normalize:
    """A colour scale centred on zero, so white means 'no effect' whatever the range."""
    bound = max((abs(s) for s in scores), default=0.0) or 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)


def _display(token: str) -> str:
    """A token as it should read in the heatmap: newlines and tabs made visible."""
    return token.replace("\n", "\u23ce").replace("\t", "\u21e5")


def wrap_tokens(tokens: Sequence[str], width: int) -> list[list[tuple[int, int]]]:
    """Greedy wrap of tokens into lines of at most ``width`` characters.

    Returns per line ``(token index, column)``; a token wider than a line gets a line of its own.
    """
    lines: list[list[tuple[int, int]]] = [[]]
    column = 0
    for i, token in enumerate(tokens):
        size = max(len(token), 1)
        if column + size > width and lines[-1]:
            lines.append([])
            column = 0
        lines[-1].append((i, column))
        column += size
    return lines


def plot_token_heatmap(attribution: Attribution, path: Path, width: int = 72, title: str | None = None) -> None:
    """Tokens coloured by attribution, wrapped over lines, with a colour bar; OCR text first when present."""
    sections = []
    if attribution.ocr_tokens:
        sections.append(("text read from the image (OCR)", attribution.ocr_tokens, attribution.ocr_token_scores))
    sections.append(("request", attribution.tokens, attribution.token_scores))
    norm = _symmetric_norm([s for _, _, scores in sections for s in scores])
    cmap = plt.get_cmap(CMAP)

    layout: list[tuple[str, list[str], list[float], list[list[tuple[int, int]]]]] = []
    for name, tokens, scores in sections:
        shown = [_display(t) for t in tokens]
        layout.append((name, shown, list(scores), wrap_tokens(shown, width)))
    rows = sum(len(lines) + 1 for *_, lines in layout)

    fig_width, title_in, bar_in = 11.0, 0.5, 0.9
    # Monospace glyphs advance 0.6 em: pick the font size that fits `width` characters per line.
    font_size = min(13.0, fig_width * 0.9 * 72 / width / 0.6)
    body_in = rows * font_size * 1.9 / 72
    height = title_in + body_in + bar_in
    fig = plt.figure(figsize=(fig_width, height))
    ax = fig.add_axes((0.05, bar_in / height, 0.9, body_in / height))
    ax.set_xlim(0, width)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    row = 0
    for name, shown, scores, lines in layout:
        ax.text(0, row + 0.5, name, fontsize=font_size * 0.85, style="italic", color="dimgray", va="center")
        row += 1
        for line in lines:
            for i, column in line:
                colour = cmap(norm(scores[i]))
                ax.add_patch(Rectangle((column, row + 0.08), max(len(shown[i]), 1), 0.84, color=colour, lw=0))
                ax.text(column, row + 0.5, shown[i], family="monospace", fontsize=font_size, va="center", ha="left")
            row += 1
    bar_ax = fig.add_axes((0.3, 0.5 / height, 0.4, 0.14 / height))
    _colorbar(fig, plt.cm.ScalarMappable(norm=norm, cmap=cmap), label="attribution", cax=bar_ax)
    heading = title or (
        f"integrated gradients of ||h_m - h_b|| at layer {attribution.fusion_layer} "
        f"(signal {attribution.signal:.3g}, baseline {attribution.baseline_signal:.3g})"
    )
    fig.suptitle(heading, fontsize=10, y=1 - 0.25 / height, va="center")
    _save(fig, path)


def plot_image_map(attribution: Attribution, image_path: Path, path: Path, title: str | None = None) -> None:
    """The image with OCR line boxes coloured by their score, or pixel saliency overlaid."""
    image = load_image(image_path)
    fig, ax = plt.subplots(figsize=(7, 7 * image.height / max(image.width, 1) + 0.8))
    ax.imshow(image)
    # A frame instead of axes: a white picture would otherwise melt into the white figure.
    ax.set_xticks([])
    ax.set_yticks([])
    mappable: plt.cm.ScalarMappable | None = None
    if attribution.image_kind == "ocr_lines":
        norm = _symmetric_norm(attribution.line_scores)
        cmap = plt.get_cmap(CMAP)
        for box, score in zip(attribution.line_boxes, attribution.line_scores):
            ax.add_patch(Polygon(box, closed=True, facecolor=cmap(norm(score)), alpha=0.55, edgecolor="black", lw=0.8))
            left, top = min(x for x, _ in box), min(y for _, y in box)
            ax.text(left, top, f"{score:+.2g}", fontsize=8, va="bottom", color="black",
                    bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})
        mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        if not attribution.line_boxes:
            ax.set_title("no text found in the image: nothing of it reaches the model", fontsize=9)
    elif attribution.image_kind == "pixels" and attribution.pixel_map is not None:
        left, top, right, bottom = attribution.pixel_box or (0.0, 0.0, float(image.width), float(image.height))
        saliency = attribution.pixel_map
        peak = float(saliency.max()) or 1.0
        shown = ax.imshow(saliency, extent=(left, right, bottom, top), cmap="inferno", alpha=0.6,
                          interpolation="bilinear", vmin=0.0, vmax=peak)
        ax.set_xlim(0, image.width)
        ax.set_ylim(image.height, 0)
        mappable = shown
    if mappable is not None:
        label = "summed attribution of the line's tokens" if attribution.image_kind == "ocr_lines" else "|attribution|"
        _colorbar(fig, mappable, label=label, ax=ax)
    fig.suptitle(title or f"image attribution ({attribution.image_kind}), layer {attribution.fusion_layer}", fontsize=10)
    _save(fig, path)


def _colorbar(fig: plt.Figure, mappable: Any, label: str, **where: Any) -> None:
    """A horizontal colour bar with a few readable ticks, however small the scores are."""
    bar = fig.colorbar(mappable, orientation="horizontal", fraction=0.05, pad=0.03, **where)
    bar.locator = MaxNLocator(5)
    bar.formatter = ScalarFormatter(useMathText=True)
    bar.formatter.set_powerlimits((-2, 3))
    bar.update_ticks()
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)


def _save(fig: plt.Figure, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
