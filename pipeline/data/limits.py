"""The request limits of ``params.yaml``'s ``limits`` section, checked before any work is done.

Prepare, the CLI, the Python API and the demo call these same checks, so a request refused in
one place is refused everywhere with the same message.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DEFAULT_LIMITS, LimitsConfig
from pipeline.errors import LSIGuardError
from pipeline.images import image_size

__all__ = ["RequestTooLarge", "check_image_size", "check_request_text"]


class RequestTooLarge(LSIGuardError, ValueError):
    """A request text longer than ``limits.max_request_chars``."""


def check_request_text(text: str, limits: LimitsConfig = DEFAULT_LIMITS, what: str = "request text") -> None:
    """Raise :class:`RequestTooLarge` if ``text`` has more than ``limits.max_request_chars`` characters.

    ``what`` names the text in the message (callers prefix ``file:line`` or a field name).
    """
    if len(text) > limits.max_request_chars:
        raise RequestTooLarge(
            f"{what} is {len(text):,} characters, over the limit of {limits.max_request_chars:,} "
            "(limits.max_request_chars)"
        )


def check_image_size(path: str | Path, limits: LimitsConfig = DEFAULT_LIMITS) -> tuple[int, int]:
    """Width and height of the image at ``path`` from its header, refused if over ``limits.max_image_pixels``.

    Nothing is decoded, so a huge image costs only its header. Raises
    :class:`~pipeline.images.ImageError` naming the file when it is missing or not an image, and
    :class:`~pipeline.images.ImageTooLarge` naming the file and its size when it has too many pixels.
    """
    return image_size(path, limits.max_image_pixels)
