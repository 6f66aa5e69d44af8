"""The embedded default model's eyes: RapidOCR reads the text in an image, cached by image hash."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from pipeline.atomic import write_text_atomic


class UnreadableImage(ValueError):
    """An image file that is missing or cannot be decoded."""


@dataclass(frozen=True)
class OCRLine:
    """One line of text found in an image, with its quadrilateral box (4 x [x, y]) and confidence."""

    text: str
    box: list[list[float]]
    score: float


@dataclass(frozen=True)
class OCRResult:
    """Everything read from one image, in reading order."""

    lines: tuple[OCRLine, ...]

    @property
    def text(self) -> str:
        """The lines joined with newlines; empty when nothing was read."""
        return "\n".join(line.text for line in self.lines)


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise UnreadableImage(f"{path}: cannot read image file ({exc.strerror or exc})") from None


class ImageReader:
    """RapidOCR with an on-disk cache keyed by the image file's sha256.

    The OCR engine is built lazily, so loading a model for text-only work costs nothing.
    """

    def __init__(self, cache_dir: Path | None = None, min_score: float = 0.5) -> None:
        self.cache_dir = cache_dir
        self.min_score = min_score
        self._engine: Any = None
        self._lock = threading.Lock()

    def _get_engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                from rapidocr import (
                    RapidOCR,  # heavy import, only when an image is read
                )

                self._engine = RapidOCR(params={"Global.log_level": "error"})
            return self._engine

    def read(self, path: Path) -> OCRResult:
        """Text lines found in the image at ``path``; unreadable files raise :class:`UnreadableImage`."""
        path = Path(path)
        digest = _file_sha256(path)
        cached = self._cache_get(digest)
        if cached is not None:
            return cached
        try:
            with Image.open(path) as image:
                image.load()
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise UnreadableImage(f"{path}: not a readable image ({exc})") from None
        import numpy as np

        output = self._get_engine()(np.asarray(rgb)[:, :, ::-1])  # RapidOCR expects BGR like OpenCV
        lines: list[OCRLine] = []
        if output.txts:
            for text, box, score in zip(output.txts, output.boxes, output.scores, strict=True):
                if float(score) >= self.min_score and text.strip():
                    lines.append(
                        OCRLine(text=text.strip(), box=[[float(x), float(y)] for x, y in box], score=float(score))
                    )
        result = OCRResult(tuple(lines))
        self._cache_put(digest, result)
        return result

    def _cache_path(self, digest: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{digest}.json"

    def _cache_get(self, digest: str) -> OCRResult | None:
        path = self._cache_path(digest)
        if path is None or not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            return OCRResult(tuple(OCRLine(**line) for line in raw["lines"]))
        except (ValueError, KeyError, TypeError):
            return None  # a damaged cache entry is recomputed, never trusted

    def _cache_put(self, digest: str, result: OCRResult) -> None:
        path = self._cache_path(digest)
        if path is None:
            return
        # Atomic: concurrent readers never see half a file.
        write_text_atomic(path, json.dumps({"lines": [asdict(line) for line in result.lines]}))
