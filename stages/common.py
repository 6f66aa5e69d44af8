"""What every stage shares: atomic writes, and one clear line instead of a traceback for bad input."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    """One JSON document, atomically."""
    _write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, atomically."""
    _write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def _known_errors() -> tuple[type[BaseException], ...]:
    from pipeline.config import ConfigError
    from pipeline.store import StoreError

    errors: list[type[BaseException]] = [ConfigError, StoreError, FileNotFoundError]
    for module, name in (
        ("pipeline.dataset", "DatasetError"),
        ("pipeline.images", "ImageError"),
        ("pipeline.models.ocr", "UnreadableImage"),
        ("pipeline.models.embedded", "ModelLoadError"),
        ("pipeline.models.hf_vlm", "ModelLoadError"),
        ("pipeline.models.smollm2_files", "EmbeddedModelMissing"),
    ):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; expected failures print one ``error:`` line naming the problem and exit 1."""
    try:
        main()
    except _known_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
