"""The request limits: text length and image pixels, checked before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import DEFAULT_LIMITS, LimitsConfig
from pipeline.data.limits import RequestTooLarge, check_image_size, check_request_text
from pipeline.errors import LSIGuardError
from pipeline.images import ImageError, ImageTooLarge


def test_request_text_at_the_limit_passes_and_one_more_is_refused() -> None:
    limits = LimitsConfig(max_request_chars=10)
    check_request_text("x" * 10, limits)
    with pytest.raises(
        RequestTooLarge, match=r"request text is 11 characters, over the limit of 10 \(limits.max_request_chars\)"
    ):
        check_request_text("x" * 11, limits)


def test_request_too_large_is_a_value_error_and_names_the_caller_text() -> None:
    assert issubclass(RequestTooLarge, LSIGuardError) and issubclass(RequestTooLarge, ValueError)
    with pytest.raises(RequestTooLarge, match=r"^req.jsonl:3: field 'text' is 200,000 characters"):
        check_request_text("y" * 200_000, DEFAULT_LIMITS, what="req.jsonl:3: field 'text'")


def test_image_size_is_read_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (30, 20), "red").save(path)
    assert check_image_size(path, LimitsConfig(max_image_pixels=600)) == (30, 20)
    with pytest.raises(ImageTooLarge, match=r"small.png: 30x20 = 600 pixels, over the limit of 599"):
        check_image_size(path, LimitsConfig(max_image_pixels=599))


def test_a_huge_image_is_refused_from_its_header(huge_png: Path) -> None:
    with pytest.raises(
        ImageTooLarge, match=r"huge.png: 20000x20000 = 400,000,000 pixels, over the limit of 40,000,000"
    ):
        check_image_size(huge_png)


def test_check_image_size_names_a_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="absent.png: image file not found"):
        check_image_size(tmp_path / "absent.png")
    (tmp_path / "notes.png").write_text("plain text")
    with pytest.raises(ImageError, match="notes.png: not a readable image"):
        check_image_size(tmp_path / "notes.png")
