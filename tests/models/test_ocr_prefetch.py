"""Reading images ahead in worker processes: the cache ends up as reading them one by one leaves it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pytest
from PIL import Image, ImageDraw, ImageFont
from transformers import PreTrainedTokenizerBase

from pipeline.config import ContrastivePrompts, ExtractConfig
from pipeline.detect.extraction import extract_to_store
from pipeline.models.base import ModelAdapter, ReadsImagesAhead
from pipeline.models.ocr import ImageReader, OCRLine
from pipeline.models.ocr_prefetch import read_images_ahead
from pipeline.testing.tiny_embedded import tiny_embedded, tiny_llama

MIN_IMAGES = 6  # the tests' threshold for starting workers (the default is sized for real runs)
WORDS = ["Bake a lemon cake", "Plant tulips", "Fix a bike chain", "Rent a boat", "Paint a fence", "Tune a guitar"]


def typed_images(folder: Path, n: int) -> list[Path]:
    """``n`` distinct images of a few typed words each; square, since the OCR engine scales an image's short
    side up to 736 pixels and a wide strip would take seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = Image.new("RGB", (480, 480), "white")
        text = f"{WORDS[i % len(WORDS)]} {i}"
        ImageDraw.Draw(image).text((16, 200), text, fill="black", font=ImageFont.load_default(size=36))
        path = folder / f"typed{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def cache_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.json"))}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return typed_images(tmp_path_factory.mktemp("typed"), MIN_IMAGES)


def test_workers_fill_the_cache_as_reading_in_process_does(images: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    ahead = ImageReader(tmp_path / "ahead")
    # a duplicate path is read once; the unreadable file is left for the forward pass to report
    assert read_images_ahead(ahead, [*images, images[0], broken], 2, False, MIN_IMAGES) == len(images) + 1
    one_by_one = ImageReader(tmp_path / "one_by_one")
    for path in images:
        one_by_one.read(path)
    written = cache_files(tmp_path / "ahead")
    assert len(written) == len(images)
    assert written == cache_files(tmp_path / "one_by_one")  # byte for byte: text, boxes, scores
    assert ahead.read(images[3]).text.replace("\n", " ") == "Rent a boat 3"
    # everything is cached now: nothing left to read
    assert read_images_ahead(ahead, images, 2, False, MIN_IMAGES) == 0


@pytest.mark.parametrize(
    ("cache", "workers", "count"),
    [(False, 2, MIN_IMAGES), (True, 1, MIN_IMAGES), (True, 2, MIN_IMAGES - 1)],
    ids=["no-cache", "one-core", "few-images"],
)
def test_nothing_is_read_ahead_where_it_cannot_pay(
    images: list[Path], tmp_path: Path, cache: bool, workers: int, count: int
) -> None:
    reader = ImageReader(tmp_path / "ocr" if cache else None)
    assert read_images_ahead(reader, images[:count], workers, False, MIN_IMAGES) == 0
    assert not (tmp_path / "ocr").exists()


class AheadRecorder:
    """An adapter that records what extraction asks it to read ahead."""

    def __init__(self, inner: ModelAdapter) -> None:
        self._inner = inner
        self.info = inner.info
        self.asked: list[list[Path]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def read_images_ahead(self, images: Sequence[Path], workers: int, progress: bool = True) -> int:
        self.asked.append(list(images))
        return 0


def test_extraction_reads_ahead_only_the_images_of_rows_still_missing(
    images: list[Path], tmp_path: Path, gguf_tokenizer: PreTrainedTokenizerBase
) -> None:
    line = OCRLine(text="Plant tulips", box=[[0.0, 0.0], [9.0, 0.0], [9.0, 9.0], [0.0, 9.0]], score=0.99)
    adapter = AheadRecorder(tiny_embedded(tiny_llama(gguf_tokenizer), gguf_tokenizer, (line,)))
    assert isinstance(adapter, ReadsImagesAhead)
    index = pl.DataFrame(
        {
            "row_id": list(range(6)),
            "text": [f"request {i}" for i in range(6)],
            "image_path": [str(images[i]) if i % 2 else None for i in range(6)],
        }
    )
    config = ExtractConfig(layers=(0, 1), batch_size=2, shard_rows=2)
    store = tmp_path / "s.zarr"
    extract_to_store(adapter, index, ContrastivePrompts(), config, store, progress=False)  # type: ignore[arg-type]
    assert adapter.asked == [[images[1], images[3], images[5]]]
    # a finished store reads nothing again
    extract_to_store(adapter, index, ContrastivePrompts(), config, store, progress=False)  # type: ignore[arg-type]
    assert len(adapter.asked) == 1
