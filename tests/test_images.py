"""Image files: deterministic PNGs and their hashes, sizes from the header, and loading errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.drawing import render_scene
from pipeline.images import ImageError, ImageTooLarge, image_size, load_image, png_bytes, save_png, too_many_pixels
from pipeline.io import sha256_bytes, sha256_file
from tests.data.conftest import corrupt_idat_bytes, huge_png_bytes


def test_a_saved_png_is_reproducible_and_named_by_its_hash(tmp_path: Path) -> None:
    image = Image.new("RGB", (5, 3), (200, 30, 10))
    assert png_bytes(image) == png_bytes(image.copy())
    digest = save_png(image, tmp_path / "red.png")
    assert digest == sha256_file(tmp_path / "red.png") == sha256_bytes(png_bytes(image))
    assert load_image(tmp_path / "red.png").tobytes() == image.tobytes()


def test_the_pixel_limit_message_names_the_image_and_its_size(tmp_path: Path) -> None:
    assert too_many_pixels("render", 20, 20, 400) is None
    error = too_many_pixels("render", 20, 21, 400)
    assert isinstance(error, ImageTooLarge)
    assert str(error) == "render: 20x21 = 420 pixels, over the limit of 400 (limits.max_image_pixels)"
    Image.new("RGB", (20, 21)).save(tmp_path / "wide.png")
    assert image_size(tmp_path / "wide.png", max_pixels=420) == (20, 21)
    with pytest.raises(ImageTooLarge, match=r"wide\.png: 20x21 = 420 pixels, over the limit of 400"):
        image_size(tmp_path / "wide.png", max_pixels=400)


def test_load_image_returns_rgb(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (10, 6), 128).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (10, 6)


def test_load_image_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="absent.png"):
        load_image(tmp_path / "absent.png")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_load_image_names_a_corrupt_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "broken.png"
    data = png_bytes(render_scene(0))
    path.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ImageError, match="broken.png"):
        load_image(path)
    assert issubclass(ImageError, ValueError)


def test_load_image_refuses_a_corrupt_pixel_stream_that_verify_passes(tmp_path: Path) -> None:
    path = tmp_path / "idat.png"
    path.write_bytes(corrupt_idat_bytes())
    with Image.open(path) as probe:
        probe.verify()  # the damage is past what verify() reads
    with pytest.raises(ImageError, match=r"idat.png: not a readable image"):
        load_image(path)


def test_load_image_refuses_too_many_pixels_before_decoding(tmp_path: Path) -> None:
    huge_png = tmp_path / "huge.png"
    huge_png.write_bytes(huge_png_bytes())  # 20,000 x 20,000 pixels in about 50 KB
    with pytest.raises(
        ImageTooLarge, match=r"huge.png: 20000x20000 = 400,000,000 pixels, over the limit of 40,000,000"
    ):
        load_image(huge_png)
    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 10), "blue").save(path)
    assert load_image(path, max_pixels=400).size == (40, 10)
    with pytest.raises(ImageTooLarge, match=r"wide.png: 40x10 = 400 pixels, over the limit of 399"):
        load_image(path, max_pixels=399)
