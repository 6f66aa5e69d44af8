"""Run the model once over every indexed request and write its last-token states to a store."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from pipeline.config import ExtractConfig
from pipeline.features import states_for_requests
from pipeline.models.base import ModelAdapter, Request
from pipeline.prompts import VARIANTS, ContrastivePrompts
from pipeline.store import ActivationStore, Provenance


class ExtractionError(ValueError):
    """A request the model could not read, named by its index rows."""


def store_provenance(adapter: ModelAdapter, prompts: ContrastivePrompts, layers: Sequence[int]) -> Provenance:
    """The provenance a store written by ``adapter`` under these prompts and layers carries."""
    info = adapter.info
    return Provenance(
        model_name=info.name,
        model_revision=info.revision,
        model_dtype=info.dtype,
        template_benign=prompts.benign,
        template_malicious=prompts.malicious,
        variants=VARIANTS,
        layers=tuple(layers),
        hidden_size=info.hidden_size,
    )


def requests_from_index(index: pl.DataFrame) -> list[Request]:
    """One :class:`Request` per index row, in row order."""
    return [
        Request(text=text, image=Path(image) if image is not None else None)
        for text, image in zip(index["text"].to_list(), index["image_path"].to_list(), strict=True)
    ]


def _batches(n: int, size: int, start: int = 0) -> Iterator[tuple[int, int]]:
    for lo in range(start, n, size):
        yield lo, min(lo + size, n)


def extract_to_store(
    adapter: ModelAdapter,
    index: pl.DataFrame,
    prompts: ContrastivePrompts,
    config: ExtractConfig,
    path: Path,
    progress: bool = True,
) -> ActivationStore:
    """Write every index row's states to a new store at ``path``, one shard at a time.

    Memory holds one shard's worth of states, whatever the number of rows.
    """
    index = index.sort("row_id")
    requests = requests_from_index(index)
    row_ids = index["row_id"].to_list()
    store = ActivationStore.create(path, row_ids, store_provenance(adapter, prompts, config.layers), config.shard_rows)
    # The context manager ends the progress line even on error, so the error starts on its own line.
    with tqdm(total=len(requests), desc="extract", unit="req", disable=not progress) as bar:
        for shard_start, shard_end in _batches(len(requests), store.shard_rows):
            blocks: list[np.ndarray] = []
            for lo, hi in _batches(shard_end, config.batch_size, start=shard_start):
                try:
                    states = states_for_requests(adapter, requests[lo:hi], prompts, config.layers)
                except ValueError as exc:  # unreadable images and the like: say which rows
                    raise ExtractionError(f"index rows {row_ids[lo:hi]}: {exc}") from exc
                blocks.append(states.numpy())
                bar.update(hi - lo)
            store.write_block(shard_start, np.concatenate(blocks))
    store.mark_complete()
    return store
