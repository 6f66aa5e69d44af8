"""Pictures drawn for requests: typography renders and procedural scenes.

Typography images follow the FigStep / MM-SafetyBench TYPO style (the request typed into a
white picture). Scenes are ordinary pictures drawn from a seed, so the demo data needs no
binary files in git; a given Pillow version renders the same bytes every time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pipeline.config import DEFAULT_LIMITS
from pipeline.images import ImageTooLarge, too_many_pixels

TYPOGRAPHY_FONT_SIZE = 40
TYPOGRAPHY_MARGIN = 24
TYPOGRAPHY_LINE_SPACING = 12
SCENE_BLUR = 1.2

RGB = tuple[int, int, int]


def _wrap(text: str, font: ImageFont.FreeTypeFont, max_width: int) -> list[str]:
    """Greedy word wrap by rendered width; an over-long word gets a line of its own."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if current and font.getlength(candidate) > max_width:
                lines.append(current)
                current = word
            else:
                current = candidate
        lines.append(current)
    return lines


def _typography_font() -> ImageFont.FreeTypeFont:
    """The FreeType face bundled with Pillow, at the typography size."""
    font = ImageFont.load_default(size=TYPOGRAPHY_FONT_SIZE)
    if not isinstance(font, ImageFont.FreeTypeFont):
        # Without FreeType Pillow falls back to a tiny bitmap font that OCR cannot read.
        raise RuntimeError("Pillow was built without FreeType; typography rendering needs it")
    return font


def _typography_layout(text: str, width: int) -> tuple[list[str], int, int]:
    """The wrapped lines of ``text``, the line height and the image height, without drawing anything."""
    if not text.strip():
        raise ValueError("typography text must not be empty")
    font = _typography_font()
    lines = _wrap(text.strip(), font, width - 2 * TYPOGRAPHY_MARGIN)
    ascent, descent = font.getmetrics()
    line_height = ascent + descent + TYPOGRAPHY_LINE_SPACING
    # Square at least, as FigStep images are: OCR detectors upscale the short side, and a
    # one-line strip blown up that far comes back as overlapping, duplicated fragments.
    height = max(width, 2 * TYPOGRAPHY_MARGIN + line_height * len(lines))
    return lines, line_height, height


def typography_size(text: str, width: int = 760) -> tuple[int, int]:
    """Width and height :func:`render_typography` would give ``text``, computed without rendering."""
    return width, _typography_layout(text, width)[2]


def check_typography(text: str, width: int = 760, max_pixels: int = DEFAULT_LIMITS.max_image_pixels) -> None:
    """Raise :class:`ImageTooLarge` if ``text`` rendered as typography would exceed ``max_pixels``."""
    error = too_many_pixels("typography image", *typography_size(text, width), max_pixels)
    if error is not None:
        raise ImageTooLarge(f"{error}; shorten the image text")


def render_typography(text: str, width: int = 760, max_pixels: int = DEFAULT_LIMITS.max_image_pixels) -> Image.Image:
    """Render ``text`` as black, word-wrapped sans-serif on white (RGB, ``width`` px wide).

    The font is the FreeType face bundled with Pillow, so no system font is needed. The image
    is at least square and grows taller when the text needs more lines. A text whose image
    would exceed ``max_pixels`` raises :class:`ImageTooLarge` before any pixel is allocated.
    """
    lines, line_height, height = _typography_layout(text, width)
    error = too_many_pixels("typography image", width, height, max_pixels)
    if error is not None:
        raise ImageTooLarge(f"{error}; shorten the image text")
    font = _typography_font()
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((TYPOGRAPHY_MARGIN, TYPOGRAPHY_MARGIN + i * line_height), line, fill="black", font=font)
    return image


def _lerp(a: RGB, b: RGB, t: float) -> RGB:
    """Linear blend of two RGB colours."""
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _gradient(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], top: RGB, bottom: RGB) -> None:
    """Fill ``box`` with a vertical gradient, one row at a time."""
    x0, y0, x1, y1 = box
    span = max(y1 - y0 - 1, 1)
    for y in range(y0, y1):
        draw.line([(x0, y), (x1 - 1, y)], fill=_lerp(top, bottom, (y - y0) / span))


def _house(draw: ImageDraw.ImageDraw, rng: random.Random, x: int, base: int, size: int) -> None:
    """A box with a pitched roof, a door and a window."""
    wall = (rng.randint(150, 240), rng.randint(110, 210), rng.randint(80, 180))
    roof = (rng.randint(90, 170), rng.randint(30, 80), rng.randint(20, 60))
    top = base - size
    draw.rectangle([x, top, x + size, base], fill=wall)
    draw.polygon([(x - size // 6, top), (x + size // 2, top - size // 2), (x + size + size // 6, top)], fill=roof)
    door_w = max(size // 5, 3)
    # Door and window only a shade off the wall: small dark squares read as glyphs to OCR.
    shade = _lerp(wall, (60, 50, 40), 0.3)
    draw.rectangle([x + size // 2 - door_w // 2, base - size // 2, x + size // 2 + door_w // 2, base], fill=shade)
    win = max(size // 4, 3)
    wx, wy = x + size // 8, top + size // 5
    draw.rectangle([wx, wy, wx + win, wy + win], fill=_lerp(wall, (180, 220, 250), 0.4))


def _tree(draw: ImageDraw.ImageDraw, rng: random.Random, x: int, base: int, size: int) -> None:
    """A trunk with a round or pointed crown."""
    trunk_w = max(size // 6, 2)
    draw.rectangle([x - trunk_w // 2, base - size // 2, x + trunk_w // 2, base], fill=(100, 70, 40))
    green = (rng.randint(20, 80), rng.randint(110, 180), rng.randint(20, 80))
    if rng.random() < 0.5:
        r = size // 2
        draw.ellipse([x - r, base - size - r // 2, x + r, base - size // 2 + r // 2], fill=green)
    else:
        foot = base - size // 3
        draw.polygon([(x - size // 2, foot), (x, foot - size), (x + size // 2, foot)], fill=green)


@dataclass(frozen=True)
class ScenePlan:
    """What a scene shows, drawn first from its seed so a caption can be written without pixels."""

    dusk: bool
    houses: int
    trees: int


_NUMBER_WORDS = ("no", "a", "two", "three", "four", "five")


def _plan(rng: random.Random) -> ScenePlan:
    """The first draws from a scene's generator: time of day and what stands on the ground."""
    return ScenePlan(dusk=rng.random() < 0.25, houses=rng.randint(0, 3), trees=rng.randint(1, 5))


def describe_scene(seed: int) -> str:
    """A short caption of what :func:`render_scene` draws for ``seed``."""
    plan = _plan(random.Random(seed))

    def count(n: int, noun: str) -> str:
        return f"{_NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}"

    time = "at dusk" if plan.dusk else "on a sunny day"
    if plan.houses:
        return f"a countryside view {time} with {count(plan.houses, 'house')} and {count(plan.trees, 'tree')}"
    return f"an open field {time} with {count(plan.trees, 'tree')} and no buildings"


def render_scene(seed: int, size: int = 336) -> Image.Image:
    """Draw an ordinary outdoor picture (sky, ground, sun, houses, trees, shapes) from ``seed``.

    The same seed always gives the same pixels; the picture contains no text.
    """
    rng = random.Random(seed)
    plan = _plan(rng)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    horizon = int(size * rng.uniform(0.5, 0.7))
    if plan.dusk:
        sky_top = (rng.randint(200, 250), rng.randint(110, 160), rng.randint(60, 110))
    else:
        sky_top = (rng.randint(40, 90), rng.randint(110, 160), rng.randint(200, 250))
    sky_bottom = (rng.randint(200, 240), rng.randint(220, 245), 250)
    _gradient(draw, (0, 0, size, horizon), sky_top, sky_bottom)
    grass_top = (rng.randint(80, 130), rng.randint(150, 200), rng.randint(60, 100))
    grass_bottom = (rng.randint(40, 80), rng.randint(90, 130), rng.randint(30, 60))
    _gradient(draw, (0, horizon, size, size), grass_top, grass_bottom)
    _sun(draw, image, rng, size, horizon)
    for _ in range(rng.randint(1, 3)):
        cx, cy, w = rng.randint(0, size), rng.randint(size // 20, horizon // 2), rng.randint(size // 8, size // 4)
        draw.ellipse([cx - w, cy - w // 4, cx + w, cy + w // 4], fill=(245, 245, 250))
    objects = [(rng.randint(0, size - size // 6), "house") for _ in range(plan.houses)]
    objects += [(rng.randint(size // 20, size - size // 20), "tree") for _ in range(plan.trees)]
    # Left to right, so overlaps look the same whatever order the draws came in.
    for x, kind in sorted(objects):
        base = horizon + rng.randint(size // 40, size // 6)
        if kind == "house":
            _house(draw, rng, x, base, rng.randint(size // 8, size // 5))
        else:
            _tree(draw, rng, x, base, rng.randint(size // 10, size // 5))
    for _ in range(rng.randint(0, 4)):
        _ground_shape(draw, image, rng, size, horizon)
    # A light blur, as in a photograph; hard synthetic edges are what OCR mistakes for glyphs.
    return image.filter(ImageFilter.GaussianBlur(radius=SCENE_BLUR))


def _sun(draw: ImageDraw.ImageDraw, image: Image.Image, rng: random.Random, size: int, horizon: int) -> None:
    """A sun with a glow of rings fading into the sky: a hard-edged disc is read as the letter O."""
    r0 = rng.randint(size // 16, size // 9)
    x, y = rng.randint(r0, size - r0), rng.randint(r0, max(horizon - 2 * r0, r0 + 1))
    sun = (255, rng.randint(200, 240), rng.randint(60, 120))
    sky = image.getpixel((x, y))
    for step in range(6, -1, -1):
        r = r0 + step * r0 // 8
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_lerp(sky, sun, 1.0 - step / 7))  # type: ignore[arg-type]


def _ground_shape(draw: ImageDraw.ImageDraw, image: Image.Image, rng: random.Random, size: int, horizon: int) -> None:
    """A loose shape on the grass (a ball, a pond, a rock), half-blended into it."""
    x, y, r = rng.randint(0, size - 1), rng.randint(horizon, size - 1), rng.randint(size // 40, size // 14)
    ground = image.getpixel((x, y))
    tint = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
    colour = _lerp(ground, tint, 0.5)  # type: ignore[arg-type]
    if rng.random() < 0.5:
        draw.ellipse([x - r, y - r // 2, x + r, y + r // 2], fill=colour)
    else:
        draw.regular_polygon((x, y, r), rng.randint(3, 6), fill=colour)
