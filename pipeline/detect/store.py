"""Activation stores: the contract between the model half and the probe half of the pipeline.

:class:`ActivationStore` creates a store, writes it in shard-aligned blocks, resumes an unfinished
one, marks it complete, and opens it to read, refusing a store that is missing, unfinished, of
another format, or written under another provenance (see :mod:`pipeline.detect.store_schema`).
Its states read through :class:`~pipeline.detect.checked_states.CheckedStates`, which checks
every shard a read touches.

Writes survive being killed at any moment. Every file goes through
:class:`~pipeline.detect.durable_store.DurableLocalStore` (temp file, fsync, rename), a new store
is built in a hidden folder and renamed into place, and the writer writes whole shards only. So a
shard's file exists exactly when all its rows are written, and an unfinished store tells a rerun
which shards are still missing.
"""

from __future__ import annotations

import math
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from zarr.core.common import AccessModeLiteral

from pipeline.detect.checked_states import CheckedStates, decode_failure
from pipeline.detect.durable_store import open_group
from pipeline.detect.store_schema import (
    CHUNK_CODECS,
    CHUNK_ROWS,
    REPAIR_ADVICE,
    STORE_DTYPE,
    STORE_FORMAT,
    Provenance,
    StoreError,
    StoreProblem,
)
from pipeline.io import is_temp_name, make_dirs_durable, rename_durable
from pipeline.run_record import HIDDEN_STATE_LIBRARIES, library_versions, warn_if_versions_differ


def _chunk_rows(shard_rows: int) -> int:
    return math.gcd(CHUNK_ROWS, shard_rows)


def effective_shard_rows(shard_rows: int, num_rows: int) -> int:
    """The shard size a store of ``num_rows`` rows gets when ``shard_rows`` is asked for."""
    return max(1, min(shard_rows, num_rows))


def _build_name(path: Path) -> str:
    """Name of a hidden folder beside ``path`` in which a new store is built before it is renamed."""
    return f".{path.name}.{uuid.uuid4().hex}.building"


def _remove_abandoned_builds(path: Path) -> None:
    """Remove folders in which a killed run was building a store at ``path`` (they hold no rows yet)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{32}}\.building")
    if path.parent.is_dir():
        for child in path.parent.iterdir():
            if child.is_dir() and pattern.fullmatch(child.name):
                shutil.rmtree(child)


def delete_store(path: Path) -> None:
    """Remove the store at ``path``; a kill midway leaves ``path`` absent, never half a store.

    It is first renamed to a hidden build folder, which :meth:`ActivationStore.create` sweeps.
    """
    path = Path(path)
    trash = path.with_name(_build_name(path))
    rename_durable(path, trash)
    shutil.rmtree(trash)


class ActivationStore:
    """A Zarr v3 activation store: create and write it in shard-aligned blocks, or open it to read."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group

    @classmethod
    def create(
        cls,
        path: Path,
        row_ids: Sequence[int],
        provenance: Provenance,
        shard_rows: int = 256,
        inputs_digest: str | None = None,
    ) -> ActivationStore:
        """Start a new store for ``row_ids``; an existing store at ``path`` is refused, never overwritten.

        The store is built in a hidden folder beside ``path`` and renamed into place, so ``path``
        either holds a whole empty store or nothing. ``inputs_digest`` (see
        :meth:`setup_differences`) lets a later run check that it is resuming the same inputs.
        """
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path}: a store already exists here; remove it or write elsewhere")
        make_dirs_durable(path.parent)
        _remove_abandoned_builds(path)
        build = path.with_name(_build_name(path))
        cls._initialise(build, row_ids, provenance, shard_rows, inputs_digest)
        rename_durable(build, path)
        return cls(path, open_group(path, "r+"))

    @staticmethod
    def _initialise(
        path: Path, row_ids: Sequence[int], provenance: Provenance, shard_rows: int, inputs_digest: str | None
    ) -> None:
        n = len(row_ids)
        shape = (n, len(provenance.variants), len(provenance.layers), provenance.hidden_size)
        group = open_group(path, "w-")
        shard_rows = effective_shard_rows(shard_rows, n)
        chunk_rows = _chunk_rows(shard_rows)
        group.create_array(
            "states",
            shape=shape,
            dtype=STORE_DTYPE,
            chunks=(chunk_rows, *shape[1:]),
            shards=(shard_rows, *shape[1:]),
            fill_value=float("nan"),  # unwritten rows read as NaN, never as plausible zeros
            compressors=CHUNK_CODECS,
        )
        ids = group.create_array(
            "row_id", shape=(n,), dtype="int64", chunks=(n,), fill_value=-1, compressors=CHUNK_CODECS
        )
        ids[:] = np.asarray(row_ids, dtype=np.int64)
        attrs: dict[str, Any] = {
            "format": STORE_FORMAT,
            "provenance": provenance.to_json(),
            "shard_rows": shard_rows,
            "complete": False,
            # Not part of the provenance check: a newer torch is no reason to refuse a store, only to warn.
            "library_versions": library_versions(HIDDEN_STATE_LIBRARIES),
        }
        if inputs_digest is not None:
            attrs["inputs_digest"] = inputs_digest
        group.attrs.update(attrs)

    @classmethod
    def open(cls, path: Path, expected: Provenance | None = None, require_complete: bool = True) -> ActivationStore:
        """Open a store for reading, refusing an unfinished one or one whose provenance differs."""
        return cls._open(Path(path), "r", expected, require_complete)

    @classmethod
    def _open(
        cls, path: Path, mode: AccessModeLiteral, expected: Provenance | None, require_complete: bool
    ) -> ActivationStore:
        if not path.exists():
            raise StoreError(f"{path}: no activation store here; run the 'extract' stage (dvc repro extract)")
        metadata = path / "zarr.json"
        if not metadata.is_file():
            raise StoreError(
                f"{path}: not a readable Zarr v3 activation store (its zarr.json is missing); {REPAIR_ADVICE}"
            )
        try:
            group = open_group(path, mode)
        except Exception as exc:  # zarr raises several types for a damaged group
            raise StoreError(f"{metadata}: not a readable Zarr v3 group ({exc}); {REPAIR_ADVICE}") from None
        store = cls(path, group)
        found = group.attrs.get("format")
        if found != STORE_FORMAT:
            raise StoreError(
                f"{metadata}: attribute 'format' is {found!r}, this code reads format {STORE_FORMAT}"
                f" (format 2 added chunk checksums); delete {path} and rerun the 'extract' stage"
            )
        for name in ("states", "row_id"):
            problem = store.array_problem(name)
            if problem is not None:
                raise StoreError(f"{path}: {problem}; {REPAIR_ADVICE}")
        if require_complete and not group.attrs.get("complete"):
            raise StoreError(
                f"{metadata}: attribute 'complete' is not true: extraction did not finish; rerun the 'extract' stage"
            )
        if expected is not None:
            diffs = store.provenance.differences(expected)
            if diffs:
                raise StoreError(
                    f"{metadata}: the store was written under a different setup than params.yaml and the model"
                    f" folder describe: {'; '.join(diffs)}. Rerun the 'extract' stage (dvc repro extract)"
                )
        warn_if_versions_differ(str(path), group.attrs.get("library_versions"))
        return store

    def array_problem(self, name: str) -> StoreProblem | None:
        """Why array ``name`` (``states`` or ``row_id``) cannot be opened, or ``None`` when it can."""
        where = f"{name}/zarr.json"
        try:
            array = self.group[name]
        except Exception as exc:  # a missing or unparsable array: zarr raises KeyError or a parse error
            return StoreProblem(where, f"array {name!r} is missing or unreadable ({type(exc).__name__}: {exc})")
        if not isinstance(array, zarr.Array):
            return StoreProblem(where, f"{name!r} is a group, not an array")
        return None

    @classmethod
    def open_unchecked(cls, path: Path) -> ActivationStore:
        """Open a store for reading without any check (for :func:`~pipeline.detect.store_verify.verify_store`)."""
        return cls(Path(path), open_group(Path(path), "r"))

    @classmethod
    def open_for_writing(cls, path: Path) -> ActivationStore:
        """Reopen a store, finished or not, to write its missing shards.

        Temp files that a writer killed mid-write left behind are removed: they were never part
        of the store, and readers must not find them.
        """
        store = cls._open(Path(path), "r+", expected=None, require_complete=False)
        for file in list(store.path.rglob("*")):
            if file.is_file() and is_temp_name(file.name):
                file.unlink()
        return store

    @property
    def provenance(self) -> Provenance:
        """The provenance recorded when the store was created; a malformed one is a :class:`StoreError`."""
        raw = self.group.attrs.get("provenance")
        problems = Provenance.problems(raw)
        if problems:
            raise StoreError(
                f"{self.path / 'zarr.json'}: attribute 'provenance' is malformed: {'; '.join(problems)}; "
                + REPAIR_ADVICE
            )
        assert isinstance(raw, dict)
        return Provenance.from_json(raw)

    @property
    def shard_rows(self) -> int:
        """Rows per shard: writes of this size (aligned to it) touch one file each."""
        return int(self.group.attrs["shard_rows"])

    @property
    def row_ids(self) -> np.ndarray:
        """The index ``row_id`` of every stored row, in store order; a damaged file is a :class:`StoreError`."""
        ids, problem = self.read_row_ids()
        if problem is not None:
            raise StoreError(f"{self.path}: {problem}; {REPAIR_ADVICE}")
        return ids

    def read_row_ids(self) -> tuple[np.ndarray, StoreProblem | None]:
        """The row ids as stored, and what is wrong with them (``None`` when nothing is); never raises."""
        array = self.group["row_id"]
        where = "row_id/" + array.metadata.encode_chunk_key((0,))
        rows = (0, int(array.shape[0]))
        if not (self.path / where).is_file():
            return np.empty(0, dtype=np.int64), StoreProblem(where, "the row ids' file is missing", rows)
        try:
            ids = np.asarray(array[:])
        except Exception as exc:  # codec errors of several types: a damaged file
            return np.empty(0, dtype=np.int64), StoreProblem(where, decode_failure(exc), rows)
        if (ids == -1).any():
            return ids, StoreProblem(where, "some rows have no row id (-1)", rows)
        return ids, None

    @property
    def num_rows(self) -> int:
        """Number of rows the store holds."""
        return int(self.group["states"].shape[0])

    @property
    def is_complete(self) -> bool:
        """Whether every shard was written and the store marked finished."""
        return bool(self.group.attrs.get("complete"))

    @property
    def inputs_digest(self) -> str | None:
        """Digest of the requests the store was created for, if its writer recorded one."""
        return self.group.attrs.get("inputs_digest")

    def shard_blocks(self) -> list[tuple[int, int]]:
        """``(start, end)`` rows of every shard, in order; the last one may be short."""
        n, size = self.num_rows, self.shard_rows
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def written_shards(self) -> list[int]:
        """Indices of the shards whose rows are all written.

        Blocks are whole shards and each shard file is replaced in one step, so a shard's file
        exists exactly when all its rows are in place. (Zarr drops a shard that holds only the
        NaN fill value; such a shard counts as unwritten, which only costs recomputing it.)
        """
        array = self.group["states"]
        inner = (0,) * (array.ndim - 1)
        folder = self.path / "states"
        blocks = range(len(self.shard_blocks()))
        return [i for i in blocks if (folder / array.metadata.encode_chunk_key((i, *inner))).is_file()]

    def missing_row_blocks(self) -> list[tuple[int, int]]:
        """``(start, end)`` rows of every shard not written yet, in order."""
        written = set(self.written_shards())
        return [block for i, block in enumerate(self.shard_blocks()) if i not in written]

    def setup_differences(
        self, provenance: Provenance, row_ids: Sequence[int], shard_rows: int, inputs_digest: str | None = None
    ) -> list[str]:
        """How this store differs from the one a run with these settings would write (empty when equal).

        ``shard_rows`` is the size asked for; the inputs are compared only when both sides have a digest.
        """
        diffs = self.provenance.differences(provenance)
        expected_shard_rows = effective_shard_rows(shard_rows, len(row_ids))
        if self.shard_rows != expected_shard_rows:
            diffs.append(f"shard_rows: store has {self.shard_rows}, expected {expected_shard_rows}")
        diffs.extend(_row_id_differences(self.row_ids, np.asarray(row_ids, dtype=np.int64)))
        if inputs_digest is not None and self.inputs_digest is not None and self.inputs_digest != inputs_digest:
            diffs.append("inputs: the texts or images of the requests changed since the store was created")
        return diffs

    def write_block(self, start: int, states: np.ndarray) -> None:
        """Write rows ``start:start+len(states)``: whole shards, so a shard is either written or not."""
        end = start + len(states)
        if start % self.shard_rows:
            raise StoreError(f"block start {start} is not aligned to the shard size {self.shard_rows}")
        if end % self.shard_rows and end != self.num_rows:
            raise StoreError(f"block end {end} is not aligned to the shard size {self.shard_rows} nor the last row")
        self.group["states"][start:end] = states.astype(STORE_DTYPE)

    def mark_complete(self) -> None:
        """Flag the store as finished; readers refuse stores without this flag. Every shard must be written."""
        missing = self.missing_row_blocks()
        if missing:
            raise StoreError(f"{self.path}: cannot mark complete, rows {missing} are not written")
        self.group.attrs["complete"] = True

    def states(self) -> da.Array:
        """All states as a lazy dask array ``(rows, variants, layers, hidden)``, one dask chunk per shard.

        Every read checks the shards it touches (see :class:`CheckedStates`).
        """
        checked = CheckedStates(
            path=self.path, array=self.group["states"], shard_rows=self.shard_rows, every_shard_written=self.is_complete
        )
        return da.from_array(
            checked,
            chunks=(self.shard_rows, *checked.shape[1:]),
            name=f"store-states-{uuid.uuid4().hex}",
            asarray=True,
            meta=np.empty((0,) * checked.ndim, dtype=checked.dtype),
        )

    def layer_states(self, layers: Sequence[int]) -> da.Array:
        """Lazy states for the given model layers only ``(rows, variants, len(layers), hidden)``."""
        stored = list(self.provenance.layers)
        missing = [k for k in layers if k not in stored]
        if missing:
            raise StoreError(f"{self.path}: layers {missing} are not in the store (it holds {stored})")
        return self.states()[:, :, [stored.index(k) for k in layers], :]


def _row_id_differences(stored: np.ndarray, expected: np.ndarray) -> list[str]:
    if len(stored) != len(expected):
        return [f"row_id: store has {len(stored)} rows, expected {len(expected)}"]
    unequal = np.flatnonzero(stored != expected)
    if len(unequal) == 0:
        return []
    first = int(unequal[0])
    return [
        f"row_id: {len(unequal)} of {len(stored)} rows differ, first at position {first}"
        f" (store has {int(stored[first])}, expected {int(expected[first])})"
    ]
