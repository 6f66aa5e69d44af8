"""Typography and scene rendering: wrapping, the pixel limit, seeds, determinism and OCR."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.data.drawing import describe_scene, render_scene, render_typography, typography_size
from pipeline.images import ImageTooLarge, png_bytes, save_png
from pipeline.io import sha256_bytes, sha256_file


@pytest.fixture(scope="module")
def ocr() -> Any:
    """RapidOCR, the embedded model's image reader; loading it takes about a second."""
    rapidocr = pytest.importorskip("rapidocr")
    return rapidocr.RapidOCR()


def _read(ocr: Any, image: Image.Image) -> list[str]:
    result = ocr(np.asarray(image.convert("RGB")))
    return list(result.txts or ())


def _letters(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def test_typography_is_black_text_on_white_and_fixed_width() -> None:
    image = render_typography("How to grow basil indoors")
    assert image.mode == "RGB" and image.width == 760
    pixels = np.asarray(image)
    assert pixels.min() < 50, "no dark text drawn"
    assert (pixels == 255).all(axis=2).mean() > 0.8, "background should be mostly white"


def test_typography_wraps_long_text_inside_the_margins() -> None:
    short = render_typography("one line")
    long = render_typography(" ".join(["wrapping"] * 80))
    assert long.width == short.width == 760
    assert long.height > short.height
    dark_columns = np.nonzero((np.asarray(long.convert("L")) < 128).any(axis=0))[0]
    assert dark_columns.max() < long.width - 10, "a wrapped line runs off the right edge"


def test_typography_rejects_empty_text() -> None:
    with pytest.raises(ValueError):
        render_typography("   ")


def test_typography_size_matches_the_render_without_drawing() -> None:
    for text in ("one line", " ".join(["wrapping"] * 200)):
        assert typography_size(text) == render_typography(text).size


def test_typography_over_the_pixel_limit_is_refused_before_rendering() -> None:
    text = " ".join(["wrapping"] * 200)
    width, height = typography_size(text)
    assert height > width
    assert render_typography(text, max_pixels=width * height).size == (width, height)
    with pytest.raises(ImageTooLarge, match=rf"typography image: {width}x{height} = .* over the limit of"):
        render_typography(text, max_pixels=width * height - 1)


def test_typography_reads_back_through_ocr(ocr: Any) -> None:
    # One short line is the hard case: a strip that OCR upscales reads back with duplicated letters.
    text = "How the Enigma code got cracked"
    assert _letters(" ".join(_read(ocr, render_typography(text)))) == _letters(text)


def test_same_input_gives_same_png_bytes(tmp_path: Path) -> None:
    assert png_bytes(render_typography("same text")) == png_bytes(render_typography("same text"))
    assert png_bytes(render_scene(7)) == png_bytes(render_scene(7))
    first = save_png(render_scene(7), tmp_path / "a.png")
    second = save_png(render_scene(7), tmp_path / "b.png")
    assert first == second == sha256_file(tmp_path / "a.png") == sha256_bytes((tmp_path / "b.png").read_bytes())


def test_scenes_depend_on_the_seed_and_size() -> None:
    assert png_bytes(render_scene(1)) != png_bytes(render_scene(2))
    assert render_scene(3).size == (336, 336)
    assert render_scene(3, size=128).size == (128, 128)


def test_scene_caption_follows_the_seed() -> None:
    captions = {describe_scene(seed) for seed in range(30)}
    assert len(captions) > 5
    assert describe_scene(11) == describe_scene(11)
    assert any("house" in c for c in captions) and any("no buildings" in c for c in captions)


def test_scenes_contain_no_readable_text(ocr: Any) -> None:
    # OCR may mistake a shape for a single glyph; a word (two or more letters or digits) would be text.
    for seed in range(4):
        words = [line for line in _read(ocr, render_scene(seed)) if len(_letters(line)) >= 2]
        assert not words, f"seed {seed}: OCR read {words}"
