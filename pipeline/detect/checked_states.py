"""Reading a store's states so that every read checks the shard files it touches.

A damaged, truncated or missing shard is a :class:`~pipeline.detect.store_schema.StoreError`
naming the shard file and its rows, never a decoder traceback or silently changed numbers. zarr's
shard index is read here by hand, so that its checksum and its offsets can be checked before zarr
decodes anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr

from pipeline.detect.store_schema import REPAIR_ADVICE, STORE_DTYPE, StoreError, StoreProblem

CHECKSUM_BYTES = 4
# A shard's index: an (offset, length) pair of uint64 per chunk, then the index's own crc32c.
INDEX_ENTRY_BYTES = 16
EMPTY_CHUNK = 2**64 - 1


def decode_failure(exc: Exception) -> str:
    """What a zarr read error says about the bytes, in one short line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "checksum" in text.lower():
        return "a chunk fails its crc32c checksum (its bytes changed since they were written)"
    return f"a chunk cannot be decoded ({type(exc).__name__}: {text[:160]})"


def _rows_touched(key: object, num_rows: int) -> tuple[int, int]:
    """The store rows ``[start, end)`` that an index ``key`` into the states array reads (all rows in between)."""
    first = key[0] if isinstance(key, tuple) and key else key
    if num_rows == 0 or first is Ellipsis or (isinstance(key, tuple) and not key):
        return 0, num_rows
    if isinstance(first, slice):
        picked = range(*first.indices(num_rows))
        return (min(picked), max(picked) + 1) if picked else (0, 0)
    positions = np.asarray(first)
    if positions.dtype == bool:
        positions = np.flatnonzero(positions)
    positions = positions.astype(np.int64).ravel()
    if positions.size == 0:
        return 0, 0
    positions = np.where(positions < 0, positions + num_rows, positions)
    return int(positions.min()), int(positions.max()) + 1


class CheckedStates:
    """A store's ``states`` array as dask reads it: every read checks the shard files it touches.

    zarr alone reads a missing or empty shard file as the NaN fill value, and raises a bare codec
    error on damaged bytes. Here a finished store's missing shard, a truncated shard, a shard index
    or chunk that fails its crc32c checksum, and a chunk gone from its shard's index are each a
    :class:`StoreError` naming the shard file (relative to the store) and its rows.
    """

    def __init__(self, *, path: Path, array: zarr.Array, shard_rows: int, every_shard_written: bool) -> None:
        """Read ``array``, the ``states`` of the store at ``path``, sharded every ``shard_rows`` rows.

        With ``every_shard_written`` (a finished store) a missing shard file is an error; without it
        a missing shard is rows not written yet, which read as NaN, the fill value.
        """
        self.path = path
        self.array = array
        self.shape: tuple[int, ...] = tuple(int(n) for n in self.array.shape)
        self.dtype = np.dtype(STORE_DTYPE)
        self.ndim = len(self.shape)
        self.shard_rows = shard_rows
        self.chunk_rows = int(self.array.chunks[0])
        self.complete = every_shard_written

    def __getitem__(self, key: Any) -> np.ndarray:
        start, end = _rows_touched(key, self.shape[0])
        shards = range(start // self.shard_rows, -(-end // self.shard_rows)) if end > start else range(0)
        for shard in shards:
            problem = self.file_problem(shard)
            if problem is not None:
                raise self._error(problem)
        try:
            values = np.asarray(self.array[key])
        except Exception as exc:  # zarr raises codec errors of several types for damaged bytes
            raise self._error(self._first_damage(shards, exc)) from None
        if np.isnan(values).any():
            # NaN is the fill value: a chunk gone from a written shard's index reads as NaN too.
            for shard in shards:
                if (self.path / self.shard_file(shard)).is_file():
                    damage = self.shard_damage(shard)
                    if damage:
                        raise self._error(damage[0])
        return values

    def shard_file(self, shard: int) -> str:
        """Shard ``shard``'s file, relative to the store (``states/c/<shard>/0/0/0``)."""
        return "states/" + self.array.metadata.encode_chunk_key((shard,) + (0,) * (self.ndim - 1))

    def shard_block(self, shard: int) -> tuple[int, int]:
        """The store rows ``[start, end)`` shard ``shard`` holds."""
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.shape[0])

    @property
    def num_shards(self) -> int:
        """How many shards the array has."""
        return -(-self.shape[0] // self.shard_rows)

    def file_problem(self, shard: int) -> StoreProblem | None:
        """What is wrong with shard ``shard``'s file as a whole (missing, truncated, index checksum), if anything."""
        where, rows = self.shard_file(shard), self.shard_block(shard)
        file = self.path / where
        if not file.is_file():
            return StoreProblem(where, "the shard file is missing", rows) if self.complete else None
        chunks = self.shard_rows // self.chunk_rows
        index_bytes = INDEX_ENTRY_BYTES * chunks + CHECKSUM_BYTES
        size = file.stat().st_size
        if size < index_bytes:
            return StoreProblem(
                where, f"the shard file is truncated ({size} bytes; its index alone takes {index_bytes})", rows
            )
        with open(file, "rb") as handle:
            handle.seek(size - index_bytes)
            index = handle.read(index_bytes)
        entries, checksum = index[:-CHECKSUM_BYTES], index[-CHECKSUM_BYTES:]
        if google_crc32c.value(entries) != int.from_bytes(checksum, "little"):
            return StoreProblem(
                where, "the shard index fails its crc32c checksum (the file is damaged or truncated)", rows
            )
        pairs = np.frombuffer(entries, dtype="<u8").reshape(chunks, 2)
        used = pairs[pairs[:, 0] != EMPTY_CHUNK]
        if len(used) and int((used[:, 0] + used[:, 1]).max()) > size - index_bytes:
            return StoreProblem(
                where, f"the shard file is truncated ({size} bytes): its index points past the end", rows
            )
        return None

    def shard_damage(self, shard: int) -> list[StoreProblem]:
        """Every problem of shard ``shard``: the file as a whole, else each chunk that fails to decode or holds NaN.

        Adjacent chunks with the same problem are reported as one row range.
        """
        problem = self.file_problem(shard)
        if problem is not None:
            return [problem]
        where, (start, end) = self.shard_file(shard), self.shard_block(shard)
        if not (self.path / where).is_file():
            return []  # an unfinished store's unwritten shard
        found: list[StoreProblem] = []
        for lo in range(start, end, self.chunk_rows):
            hi = min(lo + self.chunk_rows, end)
            try:
                block = self.array[lo:hi]
            except Exception as exc:  # codec errors of several types: a damaged chunk
                reason = decode_failure(exc)
            else:
                if not np.isnan(block).any():
                    continue
                reason = "NaN values: a chunk is gone from the shard index, or was written unfinished"
            if found and found[-1].problem == reason and found[-1].rows and found[-1].rows[1] == lo:
                found[-1] = StoreProblem(where, reason, (found[-1].rows[0], hi))
            else:
                found.append(StoreProblem(where, reason, (lo, hi)))
        return found

    def _first_damage(self, shards: range, exc: Exception) -> StoreProblem:
        """The first damaged shard among ``shards``, found by reading them chunk by chunk after ``exc``."""
        for shard in shards:
            damage = self.shard_damage(shard)
            if damage:
                return damage[0]
        # Not reproducible chunk by chunk: still name every shard the read touched.
        rows = (self.shard_block(shards[0])[0], self.shard_block(shards[-1])[1]) if shards else None
        names = ", ".join(self.shard_file(shard) for shard in shards) or "states"
        return StoreProblem(names, decode_failure(exc), rows)

    def _error(self, problem: StoreProblem) -> StoreError:
        return StoreError(f"{self.path}: {problem}; {REPAIR_ADVICE}")
