"""Whether a request may reach the model at all: its text, and its size against the run's limits.

Text characters and image pixels (read from the image header) are checked before any model work
and raise :class:`~pipeline.data.limits.RequestTooLarge` or
:class:`~pipeline.images.ImageTooLarge`; the adapter refuses a user turn over
``limits.max_request_tokens`` when it tokenises it (``RequestTooLong``); a request run under
:meth:`Guard.time_limit <pipeline.defend.guard.Guard.time_limit>` that passes its deadline raises
:class:`~pipeline.defend.deadline.RequestTimedOut`. None of these becomes an ``on_error`` answer:
answering a request the guard never checked is what the limits exist to prevent, and refusing it
silently would hide why. Callers that serve many requests (the CLI, the demo) catch
:data:`REQUEST_LIMIT_ERRORS` and report them per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.config import LimitsConfig
from pipeline.data.limits import RequestTooLarge, check_image_size, check_request_text
from pipeline.defend.deadline import RequestTimedOut
from pipeline.images import ImageError, ImageTooLarge
from pipeline.models.base import Request
from pipeline.models.literal import RequestTooLong

# Over a limit or out of time: refused with the error, whatever on_error says. The token limit is
# enforced by the adapters when they tokenise (pipeline.models.literal).
REQUEST_LIMIT_ERRORS: tuple[type[Exception], ...] = (RequestTooLarge, ImageTooLarge, RequestTooLong, RequestTimedOut)


def make_request(image: str | Path | None, text: str) -> Request:
    """A request from what a user typed and uploaded; an empty text is refused with a clear error."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the request text is empty: type what you want to ask")
    return Request(text=text, image=None if image in (None, "") else Path(image))


def describe(request: Request) -> str:
    """A short description of a request for log lines."""
    text = request.text if len(request.text) <= 60 else request.text[:57] + "..."
    return f"request {text!r}" + (f" with image {request.image}" if request.image is not None else "")


def admit(request: Request, limits: LimitsConfig) -> None:
    """Raise ``RequestTooLarge`` / ``ImageTooLarge`` for a request over ``limits`` (no model work).

    Checks the text's characters and the image's pixels from its header. A missing or
    unreadable image is not a limit: the check fails on it and ``on_error`` applies, as for
    any other failed check.
    """
    check_request_text(request.text, limits)
    if request.image is not None:
        try:
            check_image_size(request.image, limits)
        except ImageTooLarge:
            raise
        except ImageError:
            pass  # left to the check, whose failure follows on_error and is recorded


def admit_all(requests: Sequence[Request], limits: LimitsConfig) -> None:
    """:func:`admit` for every request before any is run; the error names the request's position."""
    for number, request in enumerate(requests, start=1):
        try:
            admit(request, limits)
        except (RequestTooLarge, ImageTooLarge) as exc:
            raise type(exc)(f"request {number} of {len(requests)}: {exc}") from None
