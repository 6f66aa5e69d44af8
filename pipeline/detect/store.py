"""Activation stores: the contract between the model half and the probe half of the pipeline.

One Zarr v3 group holds ``states`` shaped ``(rows, variants, layers, hidden)`` in float16,
sharded along rows so a store is a handful of files (DVC hashes every file), plus the
``row_id`` of each row. Its attributes carry the provenance (model, revision, templates and
their position, layers, dtype, code version); readers check it and refuse a mismatch by field name.
They also record the torch and transformers versions that computed the states; a reader running
others is warned, not refused.

Every chunk carries a crc32c checksum (as does every shard's index), and every read checks the
shards it touches: a damaged, truncated or missing shard is a :class:`StoreError` naming the
shard file and its rows, never a decoder traceback or silently changed numbers.

Writes survive being killed at any moment. Every file goes through :class:`DurableLocalStore`
(temp file, fsync, rename), a new store is built in a hidden folder and renamed into place, and
the writer writes whole shards only. So a shard's file exists exactly when all its rows are
written, and an unfinished store tells a rerun which shards are still missing.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import dask.array as da
import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import Buffer
from zarr.core.common import AccessModeLiteral
from zarr.storage import LocalStore

from pipeline import __version__
from pipeline.errors import LSIGuardError
from pipeline.io import is_temp_name, make_dirs_durable, rename_durable, write_bytes_durable
from pipeline.run_record import HIDDEN_STATE_LIBRARIES, library_versions, warn_if_versions_differ

# Format 2 added a crc32c checksum to every chunk; a format-1 store reads without them, so it is refused.
STORE_FORMAT = 2
STORE_DTYPE = "float16"
# Rows per chunk inside a shard: small enough to read a few examples, large enough to compress.
CHUNK_ROWS = 16
# Each chunk is compressed, then checksummed: a damaged chunk fails its checksum before zstd sees it.
CHUNK_CODECS = (ZstdCodec(level=0, checksum=False), Crc32cCodec())
CHECKSUM_BYTES = 4
# A shard's index: an (offset, length) pair of uint64 per chunk, then the index's own crc32c.
INDEX_ENTRY_BYTES = 16
EMPTY_CHUNK = 2**64 - 1
REPAIR_ADVICE = "fetch the store again (dvc pull / dvc checkout) or delete it and rerun the 'extract' stage"


class StoreError(LSIGuardError, ValueError):
    """A store that is missing, unfinished, damaged, or written under a different provenance."""


@dataclass(frozen=True)
class StoreProblem:
    """One thing wrong with a store: where (a file relative to the store, or an attribute), which rows, what."""

    where: str
    problem: str
    rows: tuple[int, int] | None = None  # store rows [start, end) the problem affects

    def __str__(self) -> str:
        rows = "" if self.rows is None else f" (store rows {self.rows[0]}-{self.rows[1] - 1})"
        return f"{self.where}{rows}: {self.problem}"


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
    # prompts.position the framings were built under; stores written before it was recorded were all "before".
    prompt_position: str = "before"
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

    @classmethod
    def problems(cls, raw: object) -> list[str]:
        """What keeps ``raw`` from being a provenance :meth:`from_json` reads (empty when it is well formed)."""
        if not isinstance(raw, dict):
            return [f"expected an object, got {type(raw).__name__}"]
        known = {f.name: f for f in fields(cls)}
        found = [f"unknown field {key!r}" for key in raw if key not in known]
        for name, spec in known.items():
            if name not in raw:
                if spec.default is MISSING and spec.default_factory is MISSING:
                    found.append(f"field {name!r} is missing")
                continue
            value = raw[name]
            if name in ("variants", "layers"):
                kind = str if name == "variants" else int
                if not isinstance(value, list) or not value or not all(_is_a(v, kind) for v in value):
                    found.append(f"field {name!r} must be a non-empty list of {kind.__name__}, got {value!r}")
            elif name == "hidden_size":
                if not _is_a(value, int) or value < 1:
                    found.append(f"field {name!r} must be a positive integer, got {value!r}")
            elif not isinstance(value, str) or not value:
                found.append(f"field {name!r} must be a non-empty string, got {value!r}")
        return found

    def differences(self, other: Provenance) -> list[str]:
        """Human-readable list of the fields in which two provenances differ."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"{key}: store has {mine[key]!r}, expected {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]


def _is_a(value: object, kind: type) -> bool:
    """``isinstance`` that does not count JSON booleans as integers."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _chunk_rows(shard_rows: int) -> int:
    return math.gcd(CHUNK_ROWS, shard_rows)


def effective_shard_rows(shard_rows: int, num_rows: int) -> int:
    """The shard size a store of ``num_rows`` rows gets when ``shard_rows`` is asked for."""
    return max(1, min(shard_rows, num_rows))


class DurableLocalStore(LocalStore):
    """A Zarr ``LocalStore`` whose writes survive a SIGKILL or a power cut at any moment.

    zarr 3.1's ``LocalStore`` already writes through a temp file and a rename, so a killed
    process leaves whole files; but it never fsyncs (a power cut can leave an empty or torn file
    under the final name) and its temp files are not ones we can recognise. Here every write,
    chunk or shard or ``zarr.json``, goes through :func:`~pipeline.io.write_bytes_durable`.
    """

    async def set(self, key: str, value: Buffer) -> None:
        """Write ``value`` under ``key``, replacing any earlier value in one step."""
        await self._set_durably(key, value, exclusive=False)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        """Write ``value`` under ``key`` unless the key already exists."""
        try:
            await self._set_durably(key, value, exclusive=True)
        except FileExistsError:
            pass

    def set_sync(self, key: str, value: Buffer) -> None:
        """Synchronous :meth:`set`."""
        self._ensure_open_sync()
        self._check_value(value)
        write_bytes_durable(self.root / key, value.as_buffer_like())

    async def _set_durably(self, key: str, value: Buffer, exclusive: bool) -> None:
        if not self._is_open:
            await self._open()
        self._check_value(value)
        await asyncio.to_thread(write_bytes_durable, self.root / key, value.as_buffer_like(), exclusive)

    def _check_value(self, value: Buffer) -> None:
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"DurableLocalStore.set(): value must be a zarr Buffer, got {type(value)}")


def _open_group(path: Path, mode: AccessModeLiteral) -> zarr.Group:
    store = DurableLocalStore(path, read_only=mode == "r")
    return zarr.open_group(store=store, mode=mode, zarr_format=3)


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
        return cls(path, _open_group(path, "r+"))

    @staticmethod
    def _initialise(
        path: Path, row_ids: Sequence[int], provenance: Provenance, shard_rows: int, inputs_digest: str | None
    ) -> None:
        n = len(row_ids)
        shape = (n, len(provenance.variants), len(provenance.layers), provenance.hidden_size)
        group = _open_group(path, "w-")
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
            group = _open_group(path, mode)
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
        return cls(Path(path), _open_group(Path(path), "r"))

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
            return np.empty(0, dtype=np.int64), StoreProblem(where, _decode_failure(exc), rows)
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
        checked = CheckedStates(self)
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


def _decode_failure(exc: Exception) -> str:
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

    def __init__(self, store: ActivationStore, every_shard_written: bool | None = None) -> None:
        """Read ``store``'s states; with ``every_shard_written`` (default: if complete) a missing shard is an error."""
        self.path = store.path
        self.array = store.group["states"]
        self.shape: tuple[int, ...] = tuple(int(n) for n in self.array.shape)
        self.dtype = np.dtype(STORE_DTYPE)
        self.ndim = len(self.shape)
        self.shard_rows = store.shard_rows
        self.chunk_rows = int(self.array.chunks[0])
        # An unfinished store's missing shards are rows not written yet: they read as NaN, as before.
        self.complete = store.is_complete if every_shard_written is None else every_shard_written

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
                reason = _decode_failure(exc)
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
        return StoreProblem(names, _decode_failure(exc), rows)

    def _error(self, problem: StoreProblem) -> StoreError:
        return StoreError(f"{self.path}: {problem}; {REPAIR_ADVICE}")
