"""The checked image of a request, from a ``data:`` URI or (when enabled) an http(s) URL, as a checked file.

The guard reads images from files, so the bytes are written to a request's own temporary folder;
then the run's limits apply exactly as everywhere else: the pixel count from the header before any
decoding (``limits.max_image_pixels``), then a full decode, so a file that is not an image is a
4xx naming the message part rather than a failed check.

Fetching URLs lets any client make this server open connections (to internal addresses too), so it
is off unless ``--allow-image-urls`` is given; a fetched image is bounded by the body-size limit and
the fetch timeout.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

import httpx

from lsi_guard_app.serve.schema import BadRequest, ImagePart
from pipeline.config import LimitsConfig
from pipeline.data.limits import check_image_size
from pipeline.images import ImageError, ImageTooLarge, load_image


def data_uri_bytes(image: ImagePart) -> bytes:
    """The bytes of a base64 ``data:image/...;base64,`` URI; :class:`BadRequest` naming the part otherwise."""
    header, comma, payload = image.url.partition(",")
    if not comma or not header.lower().startswith("data:"):
        raise BadRequest(f"{image.where}: a data URI needs 'data:<type>;base64,<data>'", image.where, "invalid_image")
    media = header[5:].split(";")
    if not media[0].lower().startswith("image/"):
        raise BadRequest(
            f"{image.where}: data URI of type {media[0] or 'none'!r}, not an image", image.where, "invalid_image"
        )
    if "base64" not in (part.strip().lower() for part in media[1:]):
        raise BadRequest(f"{image.where}: the data URI must be base64-encoded", image.where, "invalid_image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(
            f"{image.where}: the data URI is not valid base64 ({exc})", image.where, "invalid_image"
        ) from None


async def fetch_image(image: ImagePart, client: httpx.AsyncClient, max_bytes: int) -> bytes:
    """The bytes at an http(s) image URL, at most ``max_bytes``; :class:`BadRequest` naming the part otherwise."""
    try:
        async with client.stream("GET", image.url, follow_redirects=False) as response:
            if response.status_code != 200:
                raise BadRequest(
                    f"{image.where}: fetching {image.url} returned HTTP {response.status_code}",
                    image.where,
                    "image_fetch_failed",
                )
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data.extend(chunk)
                if len(data) > max_bytes:
                    raise BadRequest(
                        f"{image.where}: the image at {image.url} is over {max_bytes:,} bytes (--max-body-bytes)",
                        image.where,
                        "image_too_large",
                    )
            return bytes(data)
    except httpx.HTTPError as exc:
        raise BadRequest(
            f"{image.where}: could not fetch {image.url} ({type(exc).__name__}: {exc})",
            image.where,
            "image_fetch_failed",
        ) from None


def checked_image_file(data: bytes, image: ImagePart, folder: Path, limits: LimitsConfig) -> Path:
    """Write ``data`` into ``folder`` and check it as the guard would; the path, or :class:`BadRequest`.

    The file is named by its sha256 (the OCR cache keys on it too). Over ``limits.max_image_pixels``
    is refused from the header, before decoding; a file that does not decode is refused too.
    """
    path = folder / f"{hashlib.sha256(data).hexdigest()}.img"
    path.write_bytes(data)
    try:
        check_image_size(path, limits)  # the header only: an oversized image is never decoded
        load_image(path, limits.max_image_pixels)
    except ImageTooLarge as exc:
        raise BadRequest(_named(exc, path, image.where), image.where, "image_too_large") from None
    except ImageError as exc:
        raise BadRequest(_named(exc, path, image.where), image.where, "invalid_image") from None
    return path


def _named(exc: Exception, path: Path, where: str) -> str:
    """The image error's message with the temporary file's path replaced by the request field."""
    message = str(exc).replace(str(path), where)
    return message if message.startswith(where) else f"{where}: {message}"
