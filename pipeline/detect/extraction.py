"""Run the model once over every indexed request and write its states (as ``extract.pooling`` reads them) to a store.

Extraction can be killed at any moment and rerun: the rerun checks that the unfinished store was
started under the same setup, then computes only the shards it is missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from pipeline.config import ContrastivePrompts, ExtractConfig
from pipeline.config.pooling import LAST
from pipeline.detect.cores import available_cores
from pipeline.detect.features import states_for_requests
from pipeline.detect.provenance import provenance_for
from pipeline.detect.store import ActivationStore, delete_store
from pipeline.detect.store_schema import Provenance, StoreError
from pipeline.errors import LSIGuardError
from pipeline.models.base import ModelAdapter, ReadsImagesAhead, Request


class ExtractionError(LSIGuardError, ValueError):
    """A request the model could not read, named by its index rows."""


def store_provenance(
    adapter: ModelAdapter, prompts: ContrastivePrompts, layers: Sequence[int], pooling: str = LAST
) -> Provenance:
    """The provenance a store written by ``adapter`` under these prompts, layers and pooling carries.

    Readers compare it with :func:`~pipeline.detect.provenance.expected_provenance`, built by the
    same :func:`~pipeline.detect.provenance.provenance_for` from the model folder's metadata.
    """
    return provenance_for(adapter.info, prompts, layers, pooling)


def config_provenance(adapter: ModelAdapter, prompts: ContrastivePrompts, config: ExtractConfig) -> Provenance:
    """:func:`store_provenance` under ``config``'s layers (``all`` resolved to the adapter's blocks) and pooling."""
    return store_provenance(adapter, prompts, config.resolved_layers(adapter.info.num_layers), config.pooling)


def row_request(row: Mapping[str, Any]) -> Request:
    """The model request for one index row (image path as stored, or none)."""
    image = row.get("image_path")
    return Request(text=str(row["text"]), image=Path(image) if image else None)


def requests_from_index(index: pl.DataFrame) -> list[Request]:
    """One :class:`Request` per index row, in row order."""
    return [
        Request(text=text, image=Path(image) if image is not None else None)
        for text, image in zip(index["text"].to_list(), index["image_path"].to_list(), strict=True)
    ]


def inputs_digest(requests: Sequence[Request]) -> str:
    """SHA-256 over every request's text and image bytes, in order.

    With the provenance, this is what the stored states are a function of: a rerun compares it
    before resuming, so a store is never finished with rows computed from other inputs.
    """
    digest = hashlib.sha256()
    for request in requests:
        for part in (request.text.encode("utf-8"), _image_digest(request.image)):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def _image_digest(image: Path | None) -> bytes:
    if image is None:
        return b""
    try:
        with open(image, "rb") as file:
            return hashlib.file_digest(file, "sha256").digest()
    except OSError:  # extraction itself reports the unreadable image, naming its row
        return b"unreadable:" + str(image).encode("utf-8")


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, size):
        yield lo, min(lo + size, n)


def open_or_create_store(
    path: Path, row_ids: list[int], provenance: Provenance, config: ExtractConfig, digest: str
) -> ActivationStore:
    """The store to write into: a new one, or the one at ``path`` if it was started under this same setup."""
    if not path.exists():
        return ActivationStore.create(path, row_ids, provenance, config.shard_rows, inputs_digest=digest)
    advice = f"delete {path} to start over"
    try:
        store = ActivationStore.open_for_writing(path)
    except StoreError as exc:
        raise StoreError(f"{exc}; {advice}") from None
    diffs = store.setup_differences(provenance, row_ids, config.shard_rows, digest)
    if not diffs:
        return store
    if not store.is_complete and not store.written_shards():  # no rows in it: nothing is lost by replacing it
        delete_store(path)
        return ActivationStore.create(path, row_ids, provenance, config.shard_rows, inputs_digest=digest)
    state = "a finished" if store.is_complete else "an unfinished"
    raise StoreError(
        f"{path}: {state} store written under a different setup is in the way: {'; '.join(diffs)}."
        f" Its rows are kept; {advice}"
    )


def compute_rows(
    adapter: ModelAdapter,
    requests: Sequence[Request],
    row_ids: Sequence[int],
    prompts: ContrastivePrompts,
    config: ExtractConfig,
    bar: tqdm | None = None,
) -> np.ndarray:
    """States of ``requests`` in batches of ``config.batch_size``, counted on ``bar`` if given.

    A request the model cannot read is an :class:`ExtractionError` naming its batch's index rows.
    """
    blocks: list[np.ndarray] = []
    layers = config.resolved_layers(adapter.info.num_layers)
    for lo, hi in _batches(len(requests), config.batch_size):
        try:
            states = states_for_requests(adapter, requests[lo:hi], prompts, layers, config.pooling)
        except ValueError as exc:  # unreadable images and the like: say which rows
            raise ExtractionError(f"index rows {list(row_ids[lo:hi])}: {exc}") from exc
        blocks.append(states.numpy())
        if bar is not None:
            bar.update(hi - lo)
    return np.concatenate(blocks)


def extract_to_store(
    adapter: ModelAdapter,
    index: pl.DataFrame,
    prompts: ContrastivePrompts,
    config: ExtractConfig,
    path: Path,
    progress: bool = True,
) -> ActivationStore:
    """Write every index row's states to the store at ``path``, one shard at a time, resuming an unfinished one.

    A store already at ``path`` must have been started by this same setup (provenance, rows,
    shard size, inputs), or a :class:`~pipeline.detect.store_schema.StoreError` names what differs; its
    written shards are kept and only the missing ones are computed. A finished one is returned
    as it is. Memory holds one shard's worth of states, whatever the number of rows.
    """
    index = index.sort("row_id")
    requests = requests_from_index(index)
    row_ids = index["row_id"].to_list()
    provenance = config_provenance(adapter, prompts, config)
    store = open_or_create_store(Path(path), row_ids, provenance, config, inputs_digest(requests))
    if store.is_complete:
        return store
    missing = store.missing_row_blocks()
    done = len(requests) - sum(end - start for start, end in missing)
    if isinstance(adapter, ReadsImagesAhead):
        images = [r.image for start, end in missing for r in requests[start:end] if r.image is not None]
        adapter.read_images_ahead(images, available_cores(), progress)
    # The context manager ends the progress line even on error, so the error starts on its own line.
    with tqdm(total=len(requests), initial=done, desc="extract", unit="req", disable=not progress) as bar:
        for start, end in missing:
            states = compute_rows(adapter, requests[start:end], row_ids[start:end], prompts, config, bar)
            store.write_block(start, states)
    store.mark_complete()
    return store
