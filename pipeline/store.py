"""Activation stores: the contract between the model half and the probe half of the pipeline.

One Zarr v3 group holds ``states`` shaped ``(rows, variants, layers, hidden)`` in float16,
sharded along rows so a store is a handful of files (DVC hashes every file), plus the
``row_id`` of each row. Its attributes carry the provenance (model, revision, templates,
layers, dtype, code version); readers check it and refuse a mismatch by field name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline import __version__

STORE_FORMAT = 1
STORE_DTYPE = "float16"
# Rows per chunk inside a shard: small enough to read a few examples, large enough to compress.
CHUNK_ROWS = 16


class StoreError(ValueError):
    """A store that is missing, unfinished, or written under a different provenance."""


@dataclass(frozen=True)
class Provenance:
    """Everything that decides what a stored number means."""

    model_name: str
    model_revision: str
    model_dtype: str
    template_benign: str
    template_malicious: str
    variants: tuple[str, ...]
    layers: tuple[int, ...]
    hidden_size: int
    store_dtype: str = STORE_DTYPE
    code_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly form (tuples as lists)."""
        raw = asdict(self)
        raw["variants"], raw["layers"] = list(self.variants), list(self.layers)
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Provenance:
        """Inverse of :meth:`to_json`."""
        values = dict(raw)
        values["variants"], values["layers"] = tuple(values["variants"]), tuple(values["layers"])
        return cls(**values)

    def differences(self, other: Provenance) -> list[str]:
        """Human-readable list of the fields in which two provenances differ."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"{key}: store has {mine[key]!r}, expected {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]


def _chunk_rows(shard_rows: int) -> int:
    return math.gcd(CHUNK_ROWS, shard_rows)


class ActivationStore:
    """A Zarr v3 activation store: create and write it in shard-aligned blocks, or open it to read."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group

    @classmethod
    def create(
        cls, path: Path, row_ids: Sequence[int], provenance: Provenance, shard_rows: int = 256
    ) -> ActivationStore:
        """Start a new store for ``row_ids``; an existing store at ``path`` is refused, never overwritten."""
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path}: a store already exists here; remove it or write elsewhere")
        n = len(row_ids)
        shape = (n, len(provenance.variants), len(provenance.layers), provenance.hidden_size)
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        shard_rows = max(1, min(shard_rows, n))
        chunk_rows = _chunk_rows(shard_rows)
        group.create_array(
            "states",
            shape=shape,
            dtype=STORE_DTYPE,
            chunks=(chunk_rows, *shape[1:]),
            shards=(shard_rows, *shape[1:]),
            fill_value=float("nan"),  # unwritten rows read as NaN, never as plausible zeros
        )
        ids = group.create_array("row_id", shape=(n,), dtype="int64", chunks=(n,), fill_value=-1)
        ids[:] = np.asarray(row_ids, dtype=np.int64)
        group.attrs.update(
            {"format": STORE_FORMAT, "provenance": provenance.to_json(), "shard_rows": shard_rows, "complete": False}
        )
        return cls(path, group)

    @classmethod
    def open(cls, path: Path, expected: Provenance | None = None, require_complete: bool = True) -> ActivationStore:
        """Open a store for reading, refusing an unfinished one or one whose provenance differs."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: no activation store here; run the 'extract' stage (dvc repro extract)")
        try:
            group = zarr.open_group(str(path), mode="r+" if not require_complete else "r", zarr_format=3)
        except Exception as exc:  # zarr raises several types for a damaged group
            raise StoreError(f"{path}: not a readable Zarr v3 activation store ({exc})") from None
        store = cls(path, group)
        if group.attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: store format {group.attrs.get('format')!r}, this code reads {STORE_FORMAT}")
        if require_complete and not group.attrs.get("complete"):
            raise StoreError(f"{path}: extraction did not finish; rerun the 'extract' stage")
        if expected is not None:
            diffs = store.provenance.differences(expected)
            if diffs:
                raise StoreError(f"{path}: store was written under a different setup: " + "; ".join(diffs))
        return store

    @property
    def provenance(self) -> Provenance:
        """The provenance recorded when the store was created."""
        return Provenance.from_json(dict(self.group.attrs["provenance"]))

    @property
    def shard_rows(self) -> int:
        """Rows per shard: writes of this size (aligned to it) touch one file each."""
        return int(self.group.attrs["shard_rows"])

    @property
    def row_ids(self) -> np.ndarray:
        """The index ``row_id`` of every stored row, in store order."""
        return np.asarray(self.group["row_id"][:])

    @property
    def num_rows(self) -> int:
        """Number of rows the store holds."""
        return int(self.group["states"].shape[0])

    def write_block(self, start: int, states: np.ndarray) -> None:
        """Write rows ``start:start+len(states)``; blocks must start on a shard boundary."""
        if start % self.shard_rows:
            raise StoreError(f"block start {start} is not aligned to the shard size {self.shard_rows}")
        self.group["states"][start : start + len(states)] = states.astype(STORE_DTYPE)

    def mark_complete(self) -> None:
        """Flag the store as finished; readers refuse stores without this flag."""
        self.group.attrs["complete"] = True

    def states(self) -> da.Array:
        """All states as a lazy dask array ``(rows, variants, layers, hidden)``, one dask chunk per shard."""
        array = self.group["states"]
        return da.from_zarr(array, chunks=(self.shard_rows, *array.shape[1:]))

    def layer_states(self, layers: Sequence[int]) -> da.Array:
        """Lazy states for the given model layers only ``(rows, variants, len(layers), hidden)``."""
        stored = list(self.provenance.layers)
        missing = [k for k in layers if k not in stored]
        if missing:
            raise StoreError(f"{self.path}: layers {missing} are not in the store (it holds {stored})")
        return self.states()[:, :, [stored.index(k) for k in layers], :]
