"""The list of request sources the ``build`` stage writes and the ``prepare`` stage adds to its own."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.data.sources import DatasetError
from pipeline.io import write_json_atomic, write_jsonl_atomic


def write_sources(sources: dict[str, list[dict[str, Any]]], folder: Path, list_name: str) -> list[str]:
    """Write each source to ``folder/<name>.jsonl``, then the list of them, then drop stale ``.jsonl`` files.

    Written in that order, an interrupted run never leaves the list (``folder/list_name``) naming a
    missing file. Returns the written paths as listed.
    """
    written: list[str] = []
    for name, rows in sources.items():
        path = folder / f"{name}.jsonl"
        write_jsonl_atomic(path, rows)
        written.append(path.as_posix())
    write_json_atomic(folder / list_name, written)
    for path in folder.glob("*.jsonl"):
        if path.as_posix() not in written:
            path.unlink()
    return written


def read_built_sources(path: Path) -> list[str]:
    """The source files listed by the ``build`` stage; none when it has not written the list."""
    if not path.is_file():
        return []
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the built source list ({exc}); rerun the build stage") from None
    if not isinstance(listed, list) or not all(isinstance(item, str) and item for item in listed):
        raise DatasetError(f"{path}: expected a JSON list of source file paths, got {listed!r:.80}")
    return listed


def all_sources(configured: Sequence[str], built: Sequence[str]) -> list[str]:
    """The configured sources, then the built ones; a file listed twice is read once."""
    sources: list[str] = []
    seen: set[Path] = set()
    for source in [*configured, *built]:
        key = Path(source).resolve()
        if key not in seen:
            seen.add(key)
            sources.append(source)
    return sources
