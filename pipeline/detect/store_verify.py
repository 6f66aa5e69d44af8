"""Checking a whole activation store: every chunk, every shard index, the row ids and the attributes.

Readers check the shards they read as they read them; :func:`verify_store` checks everything at
once, for a store you received (``lsi-guard verify-store``), and reports every problem instead of
stopping at the first. It only reads: nothing is repaired or deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm
from zarr.codecs import Crc32cCodec

from pipeline.detect.checked_states import CheckedStates
from pipeline.detect.store import ActivationStore
from pipeline.detect.store_schema import STORE_FORMAT, Provenance, StoreError, StoreProblem
from pipeline.io import is_temp_name

GROUP_METADATA = "zarr.json"


def verify_store(path: Path, progress: bool = False) -> list[StoreProblem]:
    """Every problem of the store at ``path`` (empty when it is sound), with a progress bar over shards if asked.

    Checks the group's attributes (format, complete flag, shard size, provenance fields), that the
    arrays open and fit the provenance, that every chunk of ``states`` is checksummed, every shard
    file is there, whole and readable with its index and chunks passing their crc32c checksums,
    and that the row ids read back complete and unique. A missing ``path`` is a :class:`StoreError`.
    """
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path}: no activation store here (not a folder)")
    attributes, problems = _read_attributes(path)
    if attributes is None:
        return problems
    try:
        store = ActivationStore.open_unchecked(path)
    except Exception as exc:  # zarr raises several types for a damaged group
        return [*problems, StoreProblem(GROUP_METADATA, f"not a readable Zarr v3 group ({exc})")]
    broken = [problem for name in ("states", "row_id") if (problem := store.array_problem(name)) is not None]
    if broken:
        return problems + broken
    problems.extend(_shape_problems(store, attributes))
    problems.extend(_row_id_problems(store))
    if _is_count(attributes.get("shard_rows")):
        problems.extend(_shard_problems(store, progress))
    return problems


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_attributes(path: Path) -> tuple[dict | None, list[StoreProblem]]:
    """The group's attributes read straight from its ``zarr.json``, and what is wrong with them."""
    try:
        metadata = json.loads((path / GROUP_METADATA).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [StoreProblem(GROUP_METADATA, "missing: the store's attributes and provenance are gone")]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [StoreProblem(GROUP_METADATA, f"not readable JSON ({exc})")]
    attributes = metadata.get("attributes") if isinstance(metadata, dict) else None
    if not isinstance(attributes, dict):
        return None, [StoreProblem(GROUP_METADATA, "holds no attributes object")]
    problems = []
    if attributes.get("format") != STORE_FORMAT:
        problems.append(
            StoreProblem(
                GROUP_METADATA,
                f"attribute 'format' is {attributes.get('format')!r}, this code reads format {STORE_FORMAT}",
            )
        )
    if attributes.get("complete") is not True:
        problems.append(StoreProblem(GROUP_METADATA, "attribute 'complete' is not true: extraction did not finish"))
    if not _is_count(attributes.get("shard_rows")):
        problems.append(
            StoreProblem(
                GROUP_METADATA,
                f"attribute 'shard_rows' must be a positive integer, got {attributes.get('shard_rows')!r}",
            )
        )
    problems.extend(
        StoreProblem(GROUP_METADATA, f"attribute 'provenance': {problem}")
        for problem in Provenance.problems(attributes.get("provenance"))
    )
    return attributes, problems


def _shape_problems(store: ActivationStore, attributes: dict) -> list[StoreProblem]:
    """The arrays against each other, the provenance, and the checksum codec."""
    states, row_id = store.group["states"], store.group["row_id"]
    problems = []
    if not Provenance.problems(attributes.get("provenance")):
        provenance = store.provenance
        expected = (len(provenance.variants), len(provenance.layers), provenance.hidden_size)
        if tuple(states.shape[1:]) != expected:
            problems.append(
                StoreProblem(
                    "states/zarr.json",
                    f"shape {tuple(states.shape)} does not fit the provenance: (rows, {', '.join(map(str, expected))})",
                )
            )
    if row_id.shape[0] != states.shape[0]:
        problems.append(
            StoreProblem("row_id/zarr.json", f"{row_id.shape[0]} row ids for {states.shape[0]} rows of states")
        )
    for name, array in (("states", states), ("row_id", row_id)):
        codecs = getattr(array.metadata.codecs[0], "codecs", array.metadata.codecs)  # inside the shard, if sharded
        if not any(isinstance(codec, Crc32cCodec) for codec in codecs):
            problems.append(StoreProblem(f"{name}/zarr.json", "its chunks carry no crc32c checksum"))
    return problems


def _row_id_problems(store: ActivationStore) -> list[StoreProblem]:
    """The row ids: their file, checksum, no unset (-1) and no repeated id."""
    ids, problem = store.read_row_ids()
    if problem is not None:
        return [problem]
    unique, counts = np.unique(ids, return_counts=True)
    repeated = unique[counts > 1]
    if len(repeated):
        where = "row_id/" + store.group["row_id"].metadata.encode_chunk_key((0,))
        return [StoreProblem(where, f"row ids repeat: {repeated[:5].tolist()}")]
    return []


def _shard_problems(store: ActivationStore, progress: bool) -> list[StoreProblem]:
    """Every shard file of ``states`` read chunk by chunk, and any file in ``states/`` that is not part of the store."""
    checked = CheckedStates(
        path=store.path, array=store.group["states"], shard_rows=store.shard_rows, every_shard_written=True
    )
    problems: list[StoreProblem] = []
    for shard in tqdm(range(checked.num_shards), desc="verify", unit="shard", disable=not progress):
        problems.extend(checked.shard_damage(shard))
    known = {checked.shard_file(shard) for shard in range(checked.num_shards)} | {"states/zarr.json"}
    for file in sorted((store.path / "states").rglob("*")):
        where = file.relative_to(store.path).as_posix()
        if file.is_file() and where not in known:
            what = (
                "a temp file left by an interrupted write"
                if is_temp_name(file.name)
                else "a file outside the store's shards"
            )
            problems.append(StoreProblem(where, what))
    return problems
