"""Request sources: read and validate them, render their images, split them, write the index.

A source is a JSONL file, one request per line::

    {"request_id": "...", "category": "...", "label": "harmful" | "benign", "text": "...",
     "image": null | "relative/path.png"
              | {"kind": "typography", "text": "..."}
              | {"kind": "scene", "seed": 7, "caption": "..."}}

Rows that share a ``request_id`` within a source are one request in several forms (plain text,
typed into an image, ...). They always land in the same split, or a detector would be scored
on requests it was trained on.

Every row is checked before anything is written: no other keys, valid Unicode, texts within
``limits.max_request_chars``, images (given or rendered) within ``limits.max_image_pixels``, and
an image path relative to the source's folder that stays inside it.
"""

from __future__ import annotations

import difflib
import json
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.config import DEFAULT_LIMITS, LABELS, SPLITS, LimitsConfig, PrepareConfig
from pipeline.data.images import (
    ImageError,
    check_typography,
    load_image,
    png_bytes,
    render_scene,
    render_typography,
    sha256_bytes,
    write_bytes_atomic,
)
from pipeline.data.limits import RequestTooLarge, check_request_text
from pipeline.errors import LSIGuardError
from pipeline.io import jsonl_lines, replace_atomic

IMAGE_KINDS: tuple[str, ...] = ("typography", "scene")
REQUIRED_FIELDS: tuple[str, ...] = ("request_id", "category", "label", "text")
KNOWN_FIELDS: tuple[str, ...] = (*REQUIRED_FIELDS, "image")
INDEX_COLUMNS: tuple[str, ...] = (
    "row_id",
    "request_id",
    "source",
    "category",
    "split",
    "label",
    "image_path",
    "image_sha256",
    "image_kind",
    "text",
    "image_text",
)
INDEX_FILE = "index.parquet"
SUMMARY_FILE = "summary.json"
IMAGES_DIR = "images"
SPLIT_FOLDS = 20


class DatasetError(LSIGuardError, ValueError):
    """A request source or index that cannot be used, named by file (and line)."""


@dataclass(frozen=True)
class RequestRecord:
    """One validated request row.

    ``image_kind`` is ``None`` (text only), ``"typography"`` (``image_text`` rendered into the
    image), ``"scene"`` (a picture drawn from ``image_seed``, described by ``image_text``) or
    ``"file"`` (an existing image at ``image_file``).
    """

    source: str
    line: int
    request_id: str
    category: str
    label: str
    text: str
    image_kind: str | None = None
    image_text: str | None = None
    image_seed: int | None = None
    image_file: Path | None = None


def _nonempty_str(row: Mapping[str, Any], key: str, where: str) -> str:
    """A field that must be a string with something in it."""
    value = row[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{where}: field '{key}' is empty")
    return value.strip()


def _checked_length(text: str, where: str, what: str, limits: LimitsConfig) -> str:
    """``text`` if it is within ``limits.max_request_chars``; a :class:`DatasetError` naming ``where`` if not."""
    try:
        check_request_text(text, limits, what=f"{where}: {what}")
    except RequestTooLarge as exc:
        raise DatasetError(str(exc)) from None
    return text


def _image_file(value: str, where: str, base_dir: Path, limits: LimitsConfig) -> Path:
    """The image file a row names: relative, inside the source's folder, readable and small enough.

    Symlinks are resolved first, so a link pointing out of the folder is refused like ``../``.
    """
    if not value.strip():
        raise DatasetError(f"{where}: field 'image' is an empty path")
    given = Path(value)
    if given.is_absolute():
        raise DatasetError(
            f"{where}: field 'image' is an absolute path ({value}); give a path relative to the source's folder"
        )
    folder = base_dir.resolve()
    path = (folder / given).resolve()
    if not path.is_relative_to(folder):
        raise DatasetError(
            f"{where}: image {value!r} resolves to {path}, outside the source's folder {folder}; "
            "images must lie inside the folder of the source file"
        )
    try:
        load_image(path, max_pixels=limits.max_image_pixels)
    except ImageError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    return path


def _parse_image(value: Any, where: str, base_dir: Path, limits: LimitsConfig = DEFAULT_LIMITS) -> dict[str, Any]:
    """Validate a row's ``image`` into the image fields of :class:`RequestRecord`."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"image_kind": "file", "image_file": _image_file(value, where, base_dir, limits)}
    if not isinstance(value, Mapping):
        raise DatasetError(f"{where}: field 'image' must be null, a file path or an object, got {type(value).__name__}")
    kind = value.get("kind")
    if kind not in IMAGE_KINDS:
        raise DatasetError(f"{where}: unknown image kind {kind!r}; allowed: {list(IMAGE_KINDS)} (or a file path)")
    expected = {"typography": {"kind", "text"}, "scene": {"kind", "seed", "caption"}}[kind]
    if set(value) != expected:
        raise DatasetError(f"{where}: a {kind} image takes exactly the keys {sorted(expected)}, got {sorted(value)}")
    if kind == "typography":
        text = _checked_length(_nonempty_str(value, "text", f"{where}: image"), where, "image text", limits)
        try:
            # Checked from the wrapped line count, before any pixel is drawn.
            check_typography(text, max_pixels=limits.max_image_pixels)
        except ImageError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        return {"image_kind": kind, "image_text": text}
    seed = value["seed"]
    # bool is an int subclass; a seed of true is a typo, not a seed.
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DatasetError(f"{where}: image seed must be a non-negative integer, got {seed!r}")
    caption = _checked_length(_nonempty_str(value, "caption", f"{where}: image"), where, "image caption", limits)
    return {"image_kind": kind, "image_seed": seed, "image_text": caption}


def _unknown_keys(row: Mapping[str, Any], where: str) -> None:
    """Refuse keys outside :data:`KNOWN_FIELDS`: a misspelt ``image`` would otherwise drop the image."""
    unknown = [key for key in row if key not in KNOWN_FIELDS]
    if not unknown:
        return
    hints = [
        f"{key!r}: did you mean {close[0]!r}?"
        for key in unknown
        if (close := difflib.get_close_matches(key, KNOWN_FIELDS, n=1))
    ]
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise DatasetError(f"{where}: unknown key(s) {unknown}{hint}; known keys: {list(KNOWN_FIELDS)}")


def parse_request(
    row: Any, where: str, source: str, line: int, base_dir: Path, limits: LimitsConfig = DEFAULT_LIMITS
) -> RequestRecord:
    """Validate one decoded JSON row against the schema and ``limits``; ``where`` prefixes every error message."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    _unknown_keys(row, where)
    missing = [key for key in REQUIRED_FIELDS if key not in row]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {missing}; required: {list(REQUIRED_FIELDS)}")
    label = row["label"]
    if label not in LABELS:
        raise DatasetError(f"{where}: unknown label {label!r}; allowed: {sorted(LABELS)}")
    return RequestRecord(
        source=source,
        line=line,
        request_id=_nonempty_str(row, "request_id", where),
        category=_nonempty_str(row, "category", where),
        label=label,
        text=_checked_length(_nonempty_str(row, "text", where), where, "field 'text'", limits),
        **_parse_image(row.get("image"), where, base_dir, limits),
    )


def _check_groups(records: Sequence[RequestRecord], path: Path) -> None:
    """Rows sharing a request_id are one request, so they must agree on label and category."""
    first: dict[str, RequestRecord] = {}
    for record in records:
        seen = first.setdefault(record.request_id, record)
        if (seen.label, seen.category) != (record.label, record.category):
            raise DatasetError(
                f"{path}:{record.line}: request_id {record.request_id!r} is {record.label}/{record.category} "
                f"here but {seen.label}/{seen.category} on line {seen.line}"
            )


def read_requests(path: str | Path, limits: LimitsConfig = DEFAULT_LIMITS) -> list[RequestRecord]:
    """Read and validate one JSONL request source against ``limits``; errors name the file and line.

    Blank lines are skipped. A string ``image`` is a path relative to the source's folder, and
    must stay inside it.
    """
    path = Path(path)
    records = [
        parse_request(row, where, path.stem, number, path.parent, limits)
        for number, where, row in json_lines(path, DatasetError, "request source")
    ]
    if not records:
        raise DatasetError(f"{path}: no requests in file")
    _check_groups(records, path)
    return records


def json_lines(path: Path, error: type[Exception], what: str) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "path:line", decoded value)`` for each non-blank line of a JSON-lines file.

    A missing or unreadable file, a line that is not JSON and a string holding a lone surrogate
    (an escape such as ``"\\ud800"``, which JSON decoders accept but no UTF-8 writer can store)
    raise ``error`` naming the file (and line); ``what`` names the kind of file in those messages.
    A UTF-8 byte order mark is skipped; records are split on ``"\\n"`` only (:func:`jsonl_lines`).
    """
    try:
        lines = jsonl_lines(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what} ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        bad = _lone_surrogate(value, "")
        if bad is not None:
            place, char = bad
            raise error(
                f"{where}: {place} holds a lone surrogate (\\u{ord(char):04x}), which is not "
                "valid Unicode text; escape a non-BMP character as a surrogate pair or write it raw"
            )
        yield number, where, value


def _lone_surrogate(value: Any, place: str) -> tuple[str, str] | None:
    """``(where, char)`` of the first lone surrogate in a decoded JSON value, or None.

    ``where`` names the field by its key path (``field 'image.text'``), or a key itself.
    """
    if isinstance(value, str):
        found = next((char for char in value if "\ud800" <= char <= "\udfff"), None)
        return None if found is None else (f"field {place!r}" if place else "the value", found)
    items: Iterable[tuple[str, Any]] = ()
    if isinstance(value, dict):
        for key in value:
            if _lone_surrogate(key, "") is not None:
                return f"a key in {place!r}" if place else "a key", next(c for c in key if "\ud800" <= c <= "\udfff")
        items = ((str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"[{i}]", item) for i, item in enumerate(value))
    for key, item in items:
        inner = key if not place else (f"{place}{key}" if key.startswith("[") else f"{place}.{key}")
        bad = _lone_surrogate(item, inner)
        if bad is not None:
            return bad
    return None


def _fold_counts(fractions: Sequence[float], n_folds: int) -> list[int]:
    """Folds per split in proportion to ``fractions`` (largest remainder), at least one each."""
    raw = [f * n_folds for f in fractions]
    counts = [max(1, math.floor(r)) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    i = 0
    while sum(counts) < n_folds:
        counts[by_remainder[i % len(raw)]] += 1
        i += 1
    while sum(counts) > n_folds:
        # Only reachable when the one-fold minimum pushed a split up; take from the largest.
        counts[counts.index(max(counts))] -= 1
    return counts


def assign_splits(groups: Sequence[str], strata: Sequence[str], config: PrepareConfig) -> list[str]:
    """Split rows so that no group spans two splits, stratified by ``strata``.

    ``StratifiedGroupKFold`` cuts the groups into up to 20 folds with similar stratum mixes;
    whole folds then go to the splits in proportion to ``config.split_fractions``.
    """
    n_groups = len(set(groups))
    if n_groups < len(SPLITS):
        raise DatasetError(f"need at least {len(SPLITS)} distinct requests to fill {list(SPLITS)}, got {n_groups}")
    largest = max(Counter(strata).values())
    if largest < len(SPLITS):
        # Too few rows per stratum to stratify at all (tiny sources): keep only the grouping.
        strata, largest = ["all"] * len(groups), len(groups)
    # scikit-learn refuses more folds than the largest stratum has rows.
    n_folds = min(SPLIT_FOLDS, n_groups, largest)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=config.seed)
    fold_of = np.empty(len(groups), dtype=np.int64)
    with warnings.catch_warnings():
        # Strata smaller than the fold count are expected on small sources; the split is still grouped.
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, test) in enumerate(splitter.split(np.zeros(len(groups)), list(strata), list(groups))):
            fold_of[test] = fold
    names = [name for name, _ in config.split_fractions]
    counts = _fold_counts([fraction for _, fraction in config.split_fractions], n_folds)
    split_of_fold = [name for name, count in zip(names, counts, strict=True) for _ in range(count)]
    return [split_of_fold[fold] for fold in fold_of]


def _image_bytes(record: RequestRecord, max_pixels: int) -> tuple[bytes, str] | None:
    """The image file's bytes and suffix for a record, rendering specs; ``None`` for text only."""
    if record.image_kind == "typography":
        assert record.image_text is not None
        return png_bytes(render_typography(record.image_text, max_pixels=max_pixels)), ".png"
    if record.image_kind == "scene":
        assert record.image_seed is not None
        return png_bytes(render_scene(record.image_seed)), ".png"
    if record.image_kind == "file":
        assert record.image_file is not None
        # Given files are kept byte for byte: re-encoding would change what the model sees.
        return record.image_file.read_bytes(), record.image_file.suffix.lower() or ".img"
    return None


def render_images(
    records: Sequence[RequestRecord], max_pixels: int = DEFAULT_LIMITS.max_image_pixels
) -> list[tuple[bytes, str] | None]:
    """Each record's image as ``(file bytes, suffix)``, or ``None`` for text only; nothing is written.

    A repeated image is rendered once and shared.
    """
    out: list[tuple[bytes, str] | None] = []
    cache: dict[tuple[Any, ...], tuple[bytes, str] | None] = {}
    for record in records:
        key = (record.image_kind, record.image_text, record.image_seed, record.image_file)
        if key not in cache:
            cache[key] = _image_bytes(record, max_pixels)
        out.append(cache[key])
    return out


def write_images(images: Sequence[tuple[bytes, str] | None], images_dir: Path) -> list[tuple[str, str] | None]:
    """Write each image to ``images_dir/<sha256><suffix>``; return (path, sha256) or ``None`` per entry.

    Files are content-addressed, so a repeated image is stored once and an unchanged one is not
    rewritten.
    """
    out: list[tuple[str, str] | None] = []
    written: set[Path] = set()
    for image in images:
        if image is None:
            out.append(None)
            continue
        data, suffix = image
        digest = sha256_bytes(data)
        target = images_dir / f"{digest}{suffix}"
        if target not in written and (not target.is_file() or target.stat().st_size != len(data)):
            write_bytes_atomic(target, data)
        written.add(target)
        out.append((target.as_posix(), digest))
    return out


def materialize_images(
    records: Sequence[RequestRecord], images_dir: Path, max_pixels: int = DEFAULT_LIMITS.max_image_pixels
) -> list[tuple[str, str] | None]:
    """Render each record's image and write it under ``images_dir`` (:func:`render_images`, :func:`write_images`)."""
    return write_images(render_images(records, max_pixels), images_dir)


def read_sources(sources: Iterable[str | Path], limits: LimitsConfig = DEFAULT_LIMITS) -> list[RequestRecord]:
    """Read every source in order against ``limits``; two sources may not share a file stem (it names the source)."""
    records: list[RequestRecord] = []
    stems: dict[str, Path] = {}
    for source in sources:
        path = Path(source)
        if path.stem in stems:
            raise DatasetError(f"{path}: source name {path.stem!r} is already used by {stems[path.stem]}; rename one")
        stems[path.stem] = path
        records.extend(read_requests(path, limits))
    return records


def index_frame(
    records: Sequence[RequestRecord], images: Sequence[tuple[str, str] | None], splits: Sequence[str]
) -> pl.DataFrame:
    """The index table, one row per record in source order."""
    return pl.DataFrame(
        {
            "row_id": list(range(len(records))),
            "request_id": [r.request_id for r in records],
            "source": [r.source for r in records],
            "category": [r.category for r in records],
            "split": list(splits),
            "label": [LABELS[r.label] for r in records],
            "image_path": [image[0] if image else None for image in images],
            "image_sha256": [image[1] if image else None for image in images],
            "image_kind": [r.image_kind for r in records],
            "text": [r.text for r in records],
            "image_text": [r.image_text for r in records],
        },
        schema={
            "row_id": pl.Int64,
            "request_id": pl.String,
            "source": pl.String,
            "category": pl.String,
            "split": pl.String,
            "label": pl.Int64,
            "image_path": pl.String,
            "image_sha256": pl.String,
            "image_kind": pl.String,
            "text": pl.String,
            "image_text": pl.String,
        },
    )


def check_splits(index: pl.DataFrame) -> None:
    """Every split needs both labels: training, calibration and scoring all compare them."""
    names = {value: key for key, value in LABELS.items()}
    for split in SPLITS:
        present = set(index.filter(pl.col("split") == split)["label"].to_list())
        lacking = [names[label] for label in sorted(names) if label not in present]
        if lacking:
            raise DatasetError(
                f"split '{split}' has no {' or '.join(lacking)} rows; add requests or change prepare.splits"
            )


def summarize(index: pl.DataFrame) -> dict[str, Any]:
    """Counts per split x label x category, plus per image kind, for ``summary.json``."""
    names = {value: key for key, value in LABELS.items()}
    splits: dict[str, dict[str, dict[str, int]]] = {split: {label: {} for label in LABELS} for split in SPLITS}
    for split, label, category in zip(index["split"], index["label"], index["category"], strict=True):
        cell = splits[split][names[label]]
        cell[category] = cell.get(category, 0) + 1
    for split in splits.values():
        for label in split:
            split[label] = dict(sorted(split[label].items()))
    return {
        "rows": index.height,
        "requests": index.select(pl.struct("source", "request_id").n_unique()).item(),
        "sources": sorted(set(index["source"].to_list())),
        "labels": {label: int((index["label"] == value).sum()) for label, value in LABELS.items()},
        "image_kinds": dict(sorted(Counter(kind or "none" for kind in index["image_kind"].to_list()).items())),
        "splits": splits,
    }


def write_index(index: pl.DataFrame, output_dir: str | Path) -> None:
    """Write ``index.parquet`` and ``summary.json`` under ``output_dir``, each atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = json.dumps(summarize(index), indent=2) + "\n"
    replace_atomic(output_dir / INDEX_FILE, lambda tmp: index.write_parquet(tmp))
    replace_atomic(output_dir / SUMMARY_FILE, lambda tmp: tmp.write_text(summary))


def _prune_images(images_dir: Path, keep: Iterable[str]) -> None:
    """Remove images no longer referenced, so DVC does not keep hashing stale files."""
    wanted = {Path(path).name for path in keep}
    if images_dir.is_dir():
        for path in images_dir.iterdir():
            if path.is_file() and path.name not in wanted:
                path.unlink()


def build_index(
    sources: Sequence[str | Path], output_dir: str | Path, config: PrepareConfig, limits: LimitsConfig = DEFAULT_LIMITS
) -> pl.DataFrame:
    """Read ``sources``, write their images, split them and write the index; return the index.

    Outputs under ``output_dir``: ``images/<sha256>.<ext>``, ``index.parquet`` and
    ``summary.json``. Every source is validated (against ``limits`` too), split, checked and
    its images rendered in memory before anything under ``output_dir`` is created or written,
    so a bad source leaves an earlier index, its summary and its images exactly as they were.
    """
    output_dir = Path(output_dir)
    records = read_sources(sources, limits)
    groups = [f"{r.source}\x1f{r.request_id}" for r in records]
    strata = [f"{r.label}\x1f{r.category}" for r in records]
    splits = assign_splits(groups, strata, config)
    check_splits(index_frame(records, [None] * len(records), splits))
    images_dir = output_dir / IMAGES_DIR
    try:
        rendered = render_images(records, limits.max_image_pixels)
    except OSError as exc:
        raise DatasetError(f"cannot read a source's image ({exc})") from None
    try:
        images = write_images(rendered, images_dir)
    except OSError as exc:
        raise DatasetError(f"{images_dir}: cannot write images ({exc})") from None
    index = index_frame(records, images, splits)
    write_index(index, output_dir)
    _prune_images(images_dir, (image[0] for image in images if image))
    return index


def read_index(path: str | Path) -> pl.DataFrame:
    """Read an index written by :func:`build_index`, sorted by ``row_id``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such index; run the prepare stage first")
    try:
        index = pl.read_parquet(path)
    except Exception as exc:  # polars raises several unrelated types for a bad file
        raise DatasetError(f"{path}: not a readable parquet index ({exc})") from None
    missing = [column for column in INDEX_COLUMNS if column not in index.columns]
    if missing:
        raise DatasetError(f"{path}: index lacks column(s) {missing}")
    return index.sort("row_id")
