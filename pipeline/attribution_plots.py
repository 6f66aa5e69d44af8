"""Figures for attributions: a token heatmap, and the image with OCR boxes or pixel saliency."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import Normalize, TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Polygon, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from pipeline.attribution import CMAP, Attribution  # noqa: E402
from pipeline.images import load_image  # noqa: E402


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
        f"integrated gradients of ||h_m - h_b|| at layer {attribution.fusion_layer} "
        f"(signal {attribution.signal:.3g}, baseline {attribution.baseline_signal:.3g})"
    )
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=10, y=1 - title_in / 2 / height, va="center")
    _save(fig, path)


def _draw_ocr_lines(ax: plt.Axes, attribution: Attribution) -> plt.cm.ScalarMappable | None:
    """Fill each OCR line's box with the colour of its summed token score, and label it."""
    if not attribution.line_boxes:
        ax.set_title("no text found in the image: nothing of it reaches the model", fontsize=9)
        return None
    norm = _symmetric_norm(attribution.line_scores)
    cmap = plt.get_cmap(CMAP)
    for box, score in zip(attribution.line_boxes, attribution.line_scores, strict=True):
        ax.add_patch(Polygon(box, closed=True, facecolor=cmap(norm(score)), alpha=0.55, edgecolor="black", lw=0.8))
        left, top = min(x for x, _ in box), min(y for _, y in box)
        label_box = {"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1}
        ax.text(left, top, f"{score:+.2g}", fontsize=8, va="bottom", color="black", bbox=label_box)
    return plt.cm.ScalarMappable(norm=norm, cmap=cmap)


def _draw_saliency(ax: plt.Axes, attribution: Attribution, size: tuple[int, int]) -> plt.cm.ScalarMappable:
    """Overlay the pixel map on the part of the image the processor kept, stretched to fit it."""
    width, height = size
    left, top, right, bottom = attribution.pixel_box or (0.0, 0.0, float(width), float(height))
    saliency = attribution.pixel_map
    assert saliency is not None
    peak = float(saliency.max()) or 1.0
    shown = ax.imshow(
        saliency,
        extent=(left, right, bottom, top),
        cmap="inferno",
        alpha=0.6,
        interpolation="bilinear",
        vmin=0.0,
        vmax=peak,
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return shown


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
        mappable = _draw_ocr_lines(ax, attribution)
        what, label = "OCR lines", "summed attribution of the line's tokens"
    else:
        if attribution.pixel_map is not None:
            mappable = _draw_saliency(ax, attribution, image.size)
        what, label = "pixel saliency", "|attribution|"
    if mappable is not None:
        _colorbar(fig, mappable, label=label, ax=ax)
    heading = f"{what}, integrated gradients of ||h_m - h_b|| at layer {attribution.fusion_layer}"
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=10)
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
