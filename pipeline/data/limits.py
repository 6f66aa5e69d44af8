"""The ``limits`` params section applied to one request's text and image, before any model work.

Both checks are cheap: the text's length, and an image's width x height read from its header
(the pixels are never decoded here), so an oversized request is refused in milliseconds.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.config import LimitsConfig
from pipeline.data.images import ImageError
from pipeline.errors import LSIGuardError


class RequestTooLarge(LSIGuardError, ValueError):
    """A request over one of the ``limits`` (text characters, image pixels); the message names the limit."""


def check_request_text(text: str, limits: LimitsConfig) -> None:
    """Refuse a request text longer than ``limits.max_request_chars`` characters."""
    if len(text) > limits.max_request_chars:
        raise RequestTooLarge(
            f"the request text is {len(text):,} characters, over limits.max_request_chars = "
            f"{limits.max_request_chars:,}; shorten it or raise the limit in params.yaml"
        )


def check_image_size(path: str | Path, limits: LimitsConfig) -> None:
    """Refuse an image whose width x height, read from its header, exceeds ``limits.max_image_pixels``.

    A missing file or an unreadable header raises :class:`~pipeline.data.images.ImageError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning would only repeat what the check below says.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only; no pixels are decoded
                width, height = image.size
    except Image.DecompressionBombError as exc:
        # Pillow refuses to open images far over its own bound; its message carries the size.
        raise RequestTooLarge(f"{path}: {exc}; limits.max_image_pixels = {limits.max_image_pixels:,}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None
    if width * height > limits.max_image_pixels:
        raise RequestTooLarge(
            f"{path}: the image is {width} x {height} = {width * height:,} pixels, over "
            f"limits.max_image_pixels = {limits.max_image_pixels:,}; resize it or raise the limit in params.yaml"
        )
