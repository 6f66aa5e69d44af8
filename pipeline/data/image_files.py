"""The image files of request records: rendered or read in memory, then written content-addressed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_LIMITS
from pipeline.data.drawing import render_scene, render_typography
from pipeline.data.sources import RequestRecord
from pipeline.images import png_bytes
from pipeline.io import sha256_bytes, write_bytes_atomic


def _image_bytes(record: RequestRecord, max_pixels: int) -> tuple[bytes, str] | None:
    """The image file's bytes and suffix for a record, rendering specs; ``None`` for text only."""
    if record.image_kind == "typography":
        assert record.image_text is not None
        return png_bytes(render_typography(record.image_text, max_pixels=max_pixels)), ".png"
    if record.image_kind == "scene":
        assert record.image_seed is not None
        return png_bytes(render_scene(record.image_seed)), ".png"
    if record.image_kind == "file":
        assert record.image_file is not None
        # Given files are kept byte for byte: re-encoding would change what the model sees.
        return record.image_file.read_bytes(), record.image_file.suffix.lower() or ".img"
    return None


def render_images(
    records: Sequence[RequestRecord], max_pixels: int = DEFAULT_LIMITS.max_image_pixels
) -> list[tuple[bytes, str] | None]:
    """Each record's image as ``(file bytes, suffix)``, or ``None`` for text only; nothing is written.

    A repeated image is rendered once and shared.
    """
    out: list[tuple[bytes, str] | None] = []
    cache: dict[tuple[Any, ...], tuple[bytes, str] | None] = {}
    for record in records:
        key = (record.image_kind, record.image_text, record.image_seed, record.image_file)
        if key not in cache:
            cache[key] = _image_bytes(record, max_pixels)
        out.append(cache[key])
    return out


def write_images(images: Sequence[tuple[bytes, str] | None], images_dir: Path) -> list[tuple[str, str] | None]:
    """Write each image to ``images_dir/<sha256><suffix>``; return (path, sha256) or ``None`` per entry.

    Files are content-addressed, so a repeated image is stored once and an unchanged one is not
    rewritten.
    """
    out: list[tuple[str, str] | None] = []
    written: set[Path] = set()
    for image in images:
        if image is None:
            out.append(None)
            continue
        data, suffix = image
        digest = sha256_bytes(data)
        target = images_dir / f"{digest}{suffix}"
        if target not in written and (not target.is_file() or target.stat().st_size != len(data)):
            write_bytes_atomic(target, data)
        written.add(target)
        out.append((target.as_posix(), digest))
    return out


def materialize_images(
    records: Sequence[RequestRecord], images_dir: Path, max_pixels: int = DEFAULT_LIMITS.max_image_pixels
) -> list[tuple[str, str] | None]:
    """Render each record's image and write it under ``images_dir`` (:func:`render_images`, :func:`write_images`)."""
    return write_images(render_images(records, max_pixels), images_dir)
