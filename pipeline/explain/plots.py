"""Figures for attributions: a token heatmap, and the image with OCR word boxes or vision patches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: stages run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import Normalize, TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Polygon, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from pipeline.explain.patches import patch_boxes, top_indices  # noqa: E402
from pipeline.explain.record import TOP_PATCHES, Attribution  # noqa: E402
from pipeline.images import load_image  # noqa: E402

CMAP = "coolwarm"  # red raises the attributed score, blue lowers it
TOP_WORDS = 8  # OCR words numbered on the image and listed beside it


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

    fig_width, title_in, bar_in = 11.0, (0.75 if title else 0.5), 0.9
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
    heading = (
        f"integrated gradients of {attribution.target_label} "
        f"(value {attribution.signal:.3g}, baseline {attribution.baseline_signal:.3g})"
    )
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=10, y=1 - title_in / 2 / height, va="center")
    _save(fig, path)


def _legend(ax: plt.Axes, heading: str, rows: Sequence[tuple[str, float]], norm: Normalize) -> None:
    """A ranked list beside the image: rank, name and score, each score on its own colour."""
    ax.axis("off")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.text(0.0, 0.0, heading, fontsize=9, style="italic", color="dimgray", va="top")
    cmap = plt.get_cmap(CMAP)
    step = min(0.06, 0.9 / max(len(rows), 1))
    for rank, (name, score) in enumerate(rows, start=1):
        y = 0.06 + rank * step
        ax.text(0.0, y, f"{rank}", fontsize=9, weight="bold", va="center")
        ax.text(0.1, y, _display(name)[:18], fontsize=9, family="monospace", va="center")
        colour_box = {"facecolor": cmap(norm(score)), "lw": 0, "pad": 2}
        ax.text(0.98, y, f"{score:+.2e}", fontsize=8, family="monospace", va="center", ha="right", bbox=colour_box)


def _badge(ax: plt.Axes, x: float, y: float, rank: int) -> None:
    """A small rank number at a corner of a box, readable on any background."""
    style = {"facecolor": "white", "edgecolor": "black", "lw": 0.6, "pad": 1.2, "alpha": 0.9}
    ax.text(x, y, str(rank), fontsize=7, weight="bold", va="top", ha="left", bbox=style, zorder=5)


def _draw_ocr_words(ax: plt.Axes, legend_ax: plt.Axes, attribution: Attribution) -> plt.cm.ScalarMappable | None:
    """Fill each OCR word's box with the colour of its score; outline lines; number and list the top words."""
    if not attribution.word_boxes:
        ax.set_title("no text found in the image: nothing of it reaches the model", fontsize=9)
        legend_ax.axis("off")
        return None
    norm = _symmetric_norm(attribution.word_scores)
    cmap = plt.get_cmap(CMAP)
    for box in attribution.line_boxes:
        ax.add_patch(Polygon(box, closed=True, fill=False, edgecolor="dimgray", lw=0.6, ls="--"))
    for box, score in zip(attribution.word_boxes, attribution.word_scores, strict=True):
        ax.add_patch(Polygon(box, closed=True, facecolor=cmap(norm(score)), alpha=0.6, edgecolor="black", lw=0.6))
    top = top_indices(attribution.word_scores, TOP_WORDS)
    for rank, i in enumerate(top, start=1):
        box = attribution.word_boxes[i]
        _badge(ax, min(x for x, _ in box), min(y for _, y in box), rank)
    rows = [(attribution.word_texts[i], attribution.word_scores[i]) for i in top]
    _legend(legend_ax, "words with the largest |score|", rows, norm)
    return plt.cm.ScalarMappable(norm=norm, cmap=cmap)


def _draw_patches(ax: plt.Axes, legend_ax: plt.Axes, attribution: Attribution) -> plt.cm.ScalarMappable:
    """Colour the vision encoder's patch grid by patch score over the part of the image the processor kept."""
    scores = attribution.patch_scores
    assert scores is not None and attribution.pixel_box is not None
    rows, cols = scores.shape
    left, top, right, bottom = attribution.pixel_box
    norm = _symmetric_norm(scores.ravel().tolist())
    cmap = plt.get_cmap(CMAP)
    ax.imshow(scores, extent=(left, right, bottom, top), cmap=cmap, norm=norm, alpha=0.6, interpolation="nearest")
    boxes = patch_boxes((rows, cols), attribution.pixel_box)
    # Grid lines show the units the encoder sees; dense grids get fainter lines.
    line_width = 0.6 if max(rows, cols) <= 16 else 0.25
    ax.hlines(np.linspace(top, bottom, rows + 1), left, right, colors="gray", lw=line_width)
    ax.vlines(np.linspace(left, right, cols + 1), top, bottom, colors="gray", lw=line_width)
    flat = scores.ravel().tolist()
    ranked = top_indices(flat, TOP_PATCHES)
    for rank, i in enumerate(ranked, start=1):
        r, c = divmod(i, cols)
        x0, y0, x1, y1 = boxes[r][c]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="black", lw=1.4, zorder=4))
        _badge(ax, x0, y0, rank)
    rows_shown = [(f"row {i // cols}, col {i % cols}", flat[i]) for i in ranked]
    _legend(legend_ax, f"patches ({attribution.patch_size} px) with the largest |score|", rows_shown, norm)
    return plt.cm.ScalarMappable(norm=norm, cmap=cmap)


def _draw_saliency(ax: plt.Axes, attribution: Attribution) -> plt.cm.ScalarMappable:
    """Overlay the pixel map on the part of the image the processor kept, stretched to fit it."""
    saliency = attribution.pixel_map
    assert saliency is not None and attribution.pixel_box is not None
    left, top, right, bottom = attribution.pixel_box
    peak = float(saliency.max()) or 1.0
    return ax.imshow(
        saliency,
        extent=(left, right, bottom, top),
        cmap="inferno",
        alpha=0.6,
        interpolation="bilinear",
        vmin=0.0,
        vmax=peak,
    )


def plot_image_map(attribution: Attribution, image_path: Path, path: Path, title: str | None = None) -> None:
    """The image with its OCR words, or its vision patches, coloured by attribution, beside a ranked list.

    OCR images show one box per word the reader found (lines dashed); pixel images show the
    vision encoder's patch grid (pixel saliency when the model has no single patch grid).
    Red raises the attributed score, blue lowers it; the numbered boxes are the largest by |score|.
    """
    image = load_image(image_path)
    width, height = image.size
    image_in = 7.0
    fig_height = image_in * height / max(width, 1) + 1.6
    fig = plt.figure(figsize=(image_in + 3.0, fig_height))
    ax = fig.add_axes((0.02, 1.1 / fig_height, image_in / (image_in + 3.0) - 0.03, 1 - 1.7 / fig_height))
    legend_ax = fig.add_axes((image_in / (image_in + 3.0) + 0.01, 0.2, 3.0 / (image_in + 3.0) - 0.02, 0.7))
    # In grey, so that the only colours are the scores': a brown patch under a blue overlay would read as red.
    ax.imshow(image.convert("L"), cmap="gray", vmin=0, vmax=255)
    # A frame instead of axes: a white picture would otherwise melt into the white figure.
    ax.set_xticks([])
    ax.set_yticks([])
    mappable: plt.cm.ScalarMappable | None = None
    if attribution.image_kind == "ocr_lines":
        mappable = _draw_ocr_words(ax, legend_ax, attribution)
        what, label = "OCR words", "summed attribution of the word's tokens (red raises the signal)"
    elif attribution.patch_scores is not None and attribution.pixel_box is not None:
        mappable = _draw_patches(ax, legend_ax, attribution)
        what, label = "vision patches", "summed attribution of the patch's pixels (red raises the signal)"
    else:
        legend_ax.axis("off")
        if attribution.pixel_map is not None and attribution.pixel_box is not None:
            mappable = _draw_saliency(ax, attribution)
        what, label = "pixel saliency", "|attribution|"
    if attribution.pixel_box is not None:
        left, top, right, bottom = attribution.pixel_box
        # The processor's crop: only this part of the picture reaches the model.
        ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, ls=":", lw=1.0, edgecolor="k"))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    if mappable is not None:
        bar_ax = fig.add_axes((0.1, 0.45 / fig_height, 0.5, 0.14 / fig_height))
        _colorbar(fig, mappable, label=label, cax=bar_ax)
    heading = f"{what}, integrated gradients of {attribution.target_label}"
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=10, y=1 - 0.35 / fig_height, va="center")
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
