"""Request sources: read and validate the JSONL files of requests, one record per row.

A source is a JSONL file, one request per line::

    {"request_id": "...", "category": "...", "label": "harmful" | "benign", "text": "...",
     "image": null | "relative/path.png"
              | {"kind": "typography", "text": "..."}
              | {"kind": "scene", "seed": 7, "caption": "..."},
     "upstream": "...", "presentation": "..."}

``upstream`` (optional) names the project the request comes from (``llm-attacks/llm-attacks``);
without it, the source's name. ``presentation`` (optional) names how it is shown (``wrapped``,
``augmented-roleplay``); without it, the image kind (``typography``, ``scene``, ``image``) or, for
text alone, ``question`` or ``imperative`` by its last character. The held-out protocol
(:mod:`pipeline.detect.heldout`) leaves out one of either at a time.

Rows that share a ``request_id`` within a source are one request in several forms (plain text,
typed into an image, ...); they must agree on label and category.

Every row is checked before anything is written: no other keys, valid Unicode, texts within
``limits.max_request_chars``, images (given or rendered) within ``limits.max_image_pixels``, and
an image path relative to the source's folder that stays inside it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_LIMITS, LABELS, LimitsConfig
from pipeline.data.drawing import check_typography
from pipeline.data.limits import RequestTooLarge, check_request_text
from pipeline.errors import LSIGuardError
from pipeline.images import ImageError, load_image
from pipeline.io import json_lines

IMAGE_KINDS: tuple[str, ...] = ("typography", "scene")
REQUIRED_FIELDS: tuple[str, ...] = ("request_id", "category", "label", "text")
KNOWN_FIELDS: tuple[str, ...] = (*REQUIRED_FIELDS, "image", "upstream", "presentation")


class DatasetError(LSIGuardError, ValueError):
    """A request source or index that cannot be used, named by file (and line)."""


@dataclass(frozen=True, kw_only=True)
class RequestRecord:
    """One validated request row.

    ``image_kind`` is ``None`` (text only), ``"typography"`` (``image_text`` rendered into the
    image), ``"scene"`` (a picture drawn from ``image_seed``, described by ``image_text``) or
    ``"file"`` (an existing image at ``image_file``). ``upstream`` and ``presentation`` are the
    row's held-out groups (see the module docstring).
    """

    source: str
    line: int
    request_id: str
    category: str
    label: str
    text: str
    upstream: str
    presentation: str
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
    text = _checked_length(_nonempty_str(row, "text", where), where, "field 'text'", limits)
    image = _parse_image(row.get("image"), where, base_dir, limits)
    return RequestRecord(
        source=source,
        line=line,
        request_id=_nonempty_str(row, "request_id", where),
        category=_nonempty_str(row, "category", where),
        label=label,
        text=text,
        upstream=_nonempty_str(row, "upstream", where) if "upstream" in row else source,
        presentation=(
            _nonempty_str(row, "presentation", where)
            if "presentation" in row
            else default_presentation(text, image.get("image_kind"))
        ),
        **image,
    )


def default_presentation(text: str, image_kind: str | None) -> str:
    """How a row without a ``presentation`` field is shown: its image kind, else a question or an imperative."""
    if image_kind is not None:
        return "image" if image_kind == "file" else image_kind
    return "question" if text.rstrip().endswith("?") else "imperative"


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
