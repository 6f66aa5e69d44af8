"""The embedded default model's eyes: RapidOCR reads the text in an image, cached by image hash.

Each line also carries its words (whitespace-separated, as in the line's text) with their own
boxes, so attributions can point at single words in the picture. The line texts, and therefore
the prompt the model sees, do not depend on the word boxes.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_LIMITS
from pipeline.errors import LSIGuardError
from pipeline.images import ImageError, image_size, load_image
from pipeline.io import write_text_atomic

Quad = list[list[float]]  # 4 x [x, y]: top-left, top-right, bottom-right, bottom-left
# Cache entries of another format (older ones have no word boxes) are recomputed.
CACHE_FORMAT = 2


class UnreadableImage(LSIGuardError, ValueError):
    """An image file that is missing or cannot be decoded."""


@dataclass(frozen=True)
class OCRWord:
    """One whitespace-separated word of an OCR line, with its box (4 x [x, y]) and confidence."""

    text: str
    box: Quad
    score: float


@dataclass(frozen=True, kw_only=True)
class OCRLine:
    """One line of text found in an image, with its quadrilateral box (4 x [x, y]), confidence and words."""

    text: str
    box: Quad
    score: float
    words: tuple[OCRWord, ...] = ()


@dataclass(frozen=True)
class OCRResult:
    """Everything read from one image, in reading order."""

    lines: tuple[OCRLine, ...]

    @property
    def text(self) -> str:
        """The lines joined with newlines; empty when nothing was read."""
        return "\n".join(line.text for line in self.lines)


# ---------------------------------------------------------------------------------------------
# Pure helpers: words of a line and their boxes.


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character range ``[start, stop)`` of each whitespace-separated word of ``text``."""
    return [match.span() for match in re.finditer(r"\S+", text)]


def _along(a: Sequence[float], b: Sequence[float], t: float) -> list[float]:
    return [float(a[0] + t * (b[0] - a[0])), float(a[1] + t * (b[1] - a[1]))]


def split_line_box(text: str, box: Quad, score: float) -> tuple[OCRWord, ...]:
    """Words of a line with boxes cut from the line's box in proportion to their character offsets.

    The fallback when the engine gives no word boxes: each word gets the slice of the line's
    quadrilateral between its first and last character's fractions along the top and bottom
    edges, so a slanted line gives slanted word boxes.
    """
    if len(box) != 4:
        raise ValueError(f"a line box needs 4 corners, got {len(box)}")
    top_left, top_right, bottom_right, bottom_left = box
    n = max(len(text), 1)
    words: list[OCRWord] = []
    for start, stop in word_spans(text):
        a, b = start / n, stop / n
        quad = [
            _along(top_left, top_right, a),
            _along(top_left, top_right, b),
            _along(bottom_left, bottom_right, b),
            _along(bottom_left, bottom_right, a),
        ]
        words.append(OCRWord(text[start:stop], quad, float(score)))
    return tuple(words)


def union_box(boxes: Sequence[Sequence[Sequence[float]]]) -> Quad:
    """The axis-aligned rectangle around some boxes, as 4 x [x, y] corners."""
    xs = [float(x) for box in boxes for x, _ in box]
    ys = [float(y) for box in boxes for _, y in box]
    left, top, right, bottom = min(xs), min(ys), max(xs), max(ys)
    return [[left, top], [right, top], [right, bottom], [left, bottom]]


def merge_word_pieces(
    text: str, pieces: Sequence[tuple[str, float, Sequence[Sequence[float]]]], box: Quad, score: float
) -> tuple[OCRWord, ...]:
    """The line's whitespace-separated words, boxed by the engine's pieces that fall inside them.

    The engine gives one piece per word for Latin scripts but one per character for CJK (and it
    may cut a word at a gap): each word's box is the union of its pieces' boxes and its score
    their mean. Pieces are found in ``text`` in order; if they do not spell it out, or a word
    gets no piece, the whole line falls back to :func:`split_line_box`.
    """
    spans = word_spans(text)
    owned: list[list[tuple[float, Sequence[Sequence[float]]]]] = [[] for _ in spans]
    cursor = 0
    for piece, piece_score, piece_box in pieces:
        piece = piece.strip()
        if not piece:
            continue
        at = text.find(piece, cursor)
        if at < 0 or text[cursor:at].strip() or len(piece_box) != 4:
            return split_line_box(text, box, score)
        word = next(i for i, (start, stop) in enumerate(spans) if start <= at < stop)
        if at + len(piece) > spans[word][1]:
            return split_line_box(text, box, score)  # a piece across a space: not the text's words
        owned[word].append((float(piece_score), piece_box))
        cursor = at + len(piece)
    if text[cursor:].strip() or not all(owned):
        return split_line_box(text, box, score)
    return tuple(
        OCRWord(text[start:stop], union_box([b for _, b in parts]), sum(s for s, _ in parts) / len(parts))
        for (start, stop), parts in zip(spans, owned, strict=True)
    )


def line_words(line: OCRLine) -> tuple[OCRWord, ...]:
    """A line's words, from the engine when they match its text, else cut from its box."""
    expected = [line.text[a:b] for a, b in word_spans(line.text)]
    if [word.text for word in line.words] == expected:
        return line.words
    return split_line_box(line.text, line.box, line.score)


def _word_pieces(raw: Any) -> list[tuple[str, float, Sequence[Sequence[float]]]] | None:
    """The engine's ``(text, score, box)`` pieces of one line, or None when it gave none usable."""
    try:
        pieces = [(str(text), float(score), box) for text, score, box in raw]
    except (TypeError, ValueError):
        return None
    if not pieces or any(box is None for *_, box in pieces):
        return None
    return pieces


def _cache_line(raw: dict[str, Any]) -> OCRLine:
    """An :class:`OCRLine` from its cache record; a missing ``words`` key raises KeyError."""
    words = tuple(OCRWord(**word) for word in raw["words"])
    return OCRLine(text=raw["text"], box=raw["box"], score=raw["score"], words=words)


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise UnreadableImage(f"{path}: cannot read image file ({exc.strerror or exc})") from None


class ImageReader:
    """RapidOCR with an on-disk cache keyed by the image file's sha256.

    The OCR engine is built lazily, so loading a model for text-only work costs nothing.
    """

    def __init__(
        self,
        cache_dir: Path | None = None,
        min_score: float = 0.5,
        max_pixels: int = DEFAULT_LIMITS.max_image_pixels,
        *,
        engine_threads: int | None = None,
    ) -> None:
        """``engine_threads``: the OCR engine's intra-op threads (None: its default, every core); one per
        process is what :mod:`pipeline.models.ocr_prefetch` runs, several processes side by side."""
        self.cache_dir = cache_dir
        self.min_score = min_score
        self.max_pixels = max_pixels
        self.engine_threads = engine_threads
        self._engine: Any = None
        self._lock = threading.Lock()

    def _get_engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                from rapidocr import (
                    RapidOCR,  # heavy import, only when an image is read
                )

                params: dict[str, Any] = {"Global.log_level": "error"}
                if self.engine_threads is not None:
                    params["EngineConfig.onnxruntime.intra_op_num_threads"] = self.engine_threads
                self._engine = RapidOCR(params=params)
            return self._engine

    def _run_engine(self, bgr: Any) -> Any:
        """The engine's output with word boxes; without them if the engine fails to compute them.

        The engine keeps the word-box switch between calls, so every call sets it; the lock
        keeps concurrent reads from switching it under each other.
        """
        engine = self._get_engine()
        with self._lock:
            try:
                return engine(bgr, return_word_box=True)
            except (IndexError, ValueError):
                # RapidOCR's word-box pass can misalign lines it could not box; the text is still good.
                return engine(bgr, return_word_box=False)

    def is_cached(self, path: Path) -> bool:
        """Whether a reading of the image at ``path`` is in the cache (False without a cache or a readable file)."""
        if self.cache_dir is None:
            return False
        try:
            return self._cache_get(_file_sha256(Path(path))) is not None
        except UnreadableImage:
            return False

    def read(self, path: Path) -> OCRResult:
        """Text lines, with their words, found in the image at ``path``.

        Unreadable files raise :class:`UnreadableImage`.
        """
        path = Path(path)
        try:
            # The size first, from the header: a cached reading must not let an oversized file through.
            image_size(path, self.max_pixels)
            digest = _file_sha256(path)
            cached = self._cache_get(digest)
            if cached is not None:
                return cached
            # The same decoding as every other reader of request images (corrupt pixel data refused).
            rgb = load_image(path, self.max_pixels)
        except ImageError as exc:
            raise UnreadableImage(str(exc)) from None
        import numpy as np

        output = self._run_engine(np.asarray(rgb)[:, :, ::-1])  # RapidOCR expects BGR like OpenCV
        lines: list[OCRLine] = []
        if output.txts:
            # Word results line up with the lines only when the engine boxed every line.
            raw_words = list(output.word_results or ())
            if len(raw_words) != len(output.txts):
                raw_words = [None] * len(output.txts)
            for text, box, score, raw in zip(output.txts, output.boxes, output.scores, raw_words, strict=True):
                if float(score) < self.min_score or not text.strip():
                    continue
                text, quad = text.strip(), [[float(x), float(y)] for x, y in box]
                pieces = _word_pieces(raw) if raw is not None else None
                words = (
                    merge_word_pieces(text, pieces, quad, float(score))
                    if pieces
                    else split_line_box(text, quad, float(score))
                )
                lines.append(OCRLine(text=text, box=quad, score=float(score), words=words))
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
            if raw.get("format") != CACHE_FORMAT:
                return None  # written before word boxes existed: read the image again
            return OCRResult(tuple(_cache_line(line) for line in raw["lines"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # a damaged cache entry is recomputed, never trusted

    def _cache_put(self, digest: str, result: OCRResult) -> None:
        path = self._cache_path(digest)
        if path is None:
            return
        record = {"format": CACHE_FORMAT, "lines": [asdict(line) for line in result.lines]}
        # Atomic: concurrent readers never see half a file.
        write_text_atomic(path, json.dumps(record))
