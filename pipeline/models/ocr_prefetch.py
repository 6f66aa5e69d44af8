"""Reading many images ahead of the forward passes: OCR in worker processes, into the reader's cache.

RapidOCR's onnxruntime spreads one image over every core, but not evenly: on 2 cores one process
with 2 threads read 0.39-0.43 s per typography image, two processes with one thread each 0.27 s
(the same text and boxes). Extraction reads each of its images once; reading the uncached ones
here first, side by side, leaves the forward passes only cache hits. The results land in the
cache exactly as :meth:`ImageReader.read` would write them, so nothing downstream can tell.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm

from pipeline.models.ocr import ImageReader

# Fewer uncached images than this are read in process. A spawned worker imports the calling
# stage's modules again (torch, transformers) and the OCR engine: ~5-8 s before its first image,
# won back at ~0.15 s an image.
MIN_IMAGES_FOR_WORKERS = 64

logger = logging.getLogger(__name__)
_worker_reader: ImageReader | None = None


def _start_worker(cache_dir: Path, min_score: float, max_pixels: int) -> None:
    global _worker_reader
    _worker_reader = ImageReader(cache_dir, min_score=min_score, max_pixels=max_pixels, engine_threads=1)


def _read_in_worker(path: Path) -> None:
    assert _worker_reader is not None, "the worker's reader is built by its initializer"
    try:
        _worker_reader.read(path)
    except Exception:  # noqa: BLE001
        # Whatever stopped this reading (an unreadable file, the engine failing on it), the forward
        # pass reads the image again and reports the error, naming its rows; reading ahead only saves time.
        pass


def read_images_ahead(
    reader: ImageReader,
    images: Sequence[Path],
    workers: int,
    progress: bool = True,
    min_images: int = MIN_IMAGES_FOR_WORKERS,
) -> int:
    """OCR every image of ``images`` not yet in ``reader``'s cache, ``workers`` processes at once; returns
    how many it read (an unreadable one among them, its error left to the forward pass).

    Without a cache, with one worker or with fewer than ``min_images`` uncached images this does
    nothing: the forward passes read them as they come.
    """
    if reader.cache_dir is None or workers < 2:
        return 0
    todo = sorted({Path(p) for p in images if not reader.is_cached(Path(p))})
    if len(todo) < min_images:
        return 0
    # spawn: the parent holds torch's and onnxruntime's threads, which a fork would copy half-made.
    context = multiprocessing.get_context("spawn")
    init = (reader.cache_dir, reader.min_score, reader.max_pixels)
    size = min(workers, len(todo))
    done = 0
    try:
        with (
            ProcessPoolExecutor(size, mp_context=context, initializer=_start_worker, initargs=init) as pool,
            tqdm(total=len(todo), desc="read images", unit="img", disable=not progress) as bar,
        ):
            for future in as_completed([pool.submit(_read_in_worker, path) for path in todo]):
                future.result()
                done += 1
                bar.update(1)
    except BrokenProcessPool as exc:
        # Reading ahead only saves time: whatever it did not cache, the forward passes read in process.
        logger.warning(
            "reading images ahead stopped after %d of %d (%s); the rest are read in process", done, len(todo), exc
        )
    return done
