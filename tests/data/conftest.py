"""Image files shared by the data tests: a huge-but-small PNG and one with a corrupt pixel stream."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from pipeline.data.drawing import render_scene
from pipeline.images import png_bytes

HUGE_SIDE = 20_000


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_bytes(side: int = HUGE_SIDE) -> bytes:
    """A valid ``side`` x ``side`` one-colour PNG, streamed row by row so it never exists as pixels.

    One bit per pixel keeps the raw stream at side * (side / 8 + 1) bytes; all zeros, it
    compresses to a few tens of kilobytes.
    """
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte "none", then the packed pixels
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def corrupt_idat_bytes() -> bytes:
    """A real PNG whose compressed pixel stream is damaged while every chunk checksum stays valid.

    The header and checksums pass ``verify()``; only decoding the pixels finds the damage.
    """
    data = bytearray(png_bytes(render_scene(0)))
    start = data.index(b"IDAT")
    length = struct.unpack(">I", data[start - 4 : start])[0]
    middle = start + 4 + length // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    crc = zlib.crc32(bytes(data[start : start + 4 + length])) & 0xFFFFFFFF
    data[start + 4 + length : start + 8 + length] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20,000 x 20,000 PNG (400 megapixels) of one colour, a small file; made once a session."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    path.write_bytes(huge_png_bytes())
    return path
