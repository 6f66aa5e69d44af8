"""What an activation store holds and means: its format, its provenance, and how problems with one are named.

One Zarr v3 group holds ``states`` shaped ``(rows, variants, layers, hidden)`` in float16,
sharded along rows so a store is a handful of files (DVC hashes every file), plus the
``row_id`` of each row. Its attributes carry the :class:`Provenance` (model, revision, templates
and their position, layers, pooling, dtype, code version); readers check it and refuse a mismatch by field
name. They also record the torch and transformers versions that computed the states; a reader
running others is warned, not refused. Every chunk is compressed, then checksummed with crc32c.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from zarr.codecs import Crc32cCodec, ZstdCodec

from pipeline.config.pooling import LAST, POOLINGS
from pipeline.errors import LSIGuardError
from pipeline.version import __version__

# Format 2 added a crc32c checksum to every chunk; a format-1 store reads without them, so it is refused.
STORE_FORMAT = 2
STORE_DTYPE = "float16"
# Rows per chunk inside a shard: small enough to read a few examples, large enough to compress.
CHUNK_ROWS = 16
# Each chunk is compressed, then checksummed: a damaged chunk fails its checksum before zstd sees it.
CHUNK_CODECS = (ZstdCodec(level=0, checksum=False), Crc32cCodec())
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


@dataclass(frozen=True, kw_only=True)
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
    # extract.pooling the states were read under; stores written before it was recorded were all "last".
    pooling: str = LAST
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
            elif name == "pooling":
                if value not in POOLINGS:
                    found.append(f"field {name!r} must be one of {list(POOLINGS)}, got {value!r}")
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
