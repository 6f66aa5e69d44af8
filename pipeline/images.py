"""Image files: safe loading within a pixel limit, and deterministic PNG encoding.

Every reader of request images (prepare, the guard, the model adapters, the CLI and the demo)
opens them through :func:`load_image` or :func:`image_size`, so they accept and refuse the same
files with the same messages.
"""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.config import DEFAULT_LIMITS
from pipeline.errors import LSIGuardError
from pipeline.io import sha256_bytes, write_bytes_atomic


class ImageError(LSIGuardError, ValueError):
    """An image file that is missing or cannot be decoded, named by its path."""


class ImageTooLarge(ImageError):
    """An image (a file, or a typography render) with more pixels than ``limits.max_image_pixels``."""


# Pillow's own decompression-bomb limit is process-wide; it is set from the configured limit so
# that any other code opening images in this process is bounded too. The checks below come
# first and give the clearer message.
Image.MAX_IMAGE_PIXELS = DEFAULT_LIMITS.max_image_pixels
_PILLOW_LIMIT = threading.Lock()


def too_many_pixels(what: str, width: int, height: int, max_pixels: int) -> ImageTooLarge | None:
    """The error for a ``width`` x ``height`` image over ``max_pixels``, or None when it fits.

    ``what`` names the image (a path, or the kind of render) at the start of the message.
    """
    if width * height <= max_pixels:
        return None
    return ImageTooLarge(
        f"{what}: {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
        "(limits.max_image_pixels)"
    )


def png_bytes(image: Image.Image) -> bytes:
    """Encode ``image`` as PNG with no metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    # A fixed compression level and no text chunks keep the output reproducible.
    image.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | Path) -> str:
    """Save ``image`` as a deterministic PNG at ``path``; return the file's sha256."""
    data = png_bytes(image)
    write_bytes_atomic(path, data)
    return sha256_bytes(data)


def _open_header(path: Path) -> Image.Image:
    """``Image.open``, which reads only the header, with Pillow's own pixel check held off.

    Pillow refuses or warns about a large image inside ``open`` with a message that gives
    neither the file nor its width and height; :func:`image_size` checks the size itself.
    The lock keeps concurrent callers from seeing each other's setting of the global.
    """
    with _PILLOW_LIMIT:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


def image_size(path: str | Path, max_pixels: int = DEFAULT_LIMITS.max_image_pixels) -> tuple[int, int]:
    """Width and height of the image at ``path``, read from its header; nothing is decoded.

    Raises :class:`ImageError` naming ``path`` when the file is missing or not an image, and
    :class:`ImageTooLarge` naming it and its size when width x height exceeds ``max_pixels``.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with _open_header(path) as image:
            width, height = image.size
    except _READ_ERRORS as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None
    error = too_many_pixels(str(path), width, height, max_pixels)
    if error is not None:
        raise error
    return width, height


def load_image(path: str | Path, max_pixels: int = DEFAULT_LIMITS.max_image_pixels) -> Image.Image:
    """Open and fully decode an image as RGB, after checking its size against ``max_pixels``.

    Raises :class:`ImageError` naming ``path`` if it is missing or cannot be decoded (a bad
    checksum, a corrupt or cut-off pixel stream), and :class:`ImageTooLarge` before any decoding
    if it has too many pixels.
    """
    path = Path(path)
    image_size(path, max_pixels)
    try:
        with warnings.catch_warnings():
            # Some formats check frame sizes again while decoding; over the limit is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # verify() checks chunk checksums cheaply but does not decode the pixel stream and
            # leaves the image unusable, so the file is opened again for a full load().
            with _open_header(path) as probe:
                probe.verify()
            with _open_header(path) as image:
                image.load()
                return image.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLarge(f"{path}: too many pixels ({exc}); the limit is limits.max_image_pixels") from None
    except _READ_ERRORS as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None
