"""Checksums of files and folders, to show that a failed call left earlier outputs byte-identical."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digests(folder: Path, root: Path | None = None) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, keyed by its path relative to ``root`` (default: ``folder``)."""
    folder = Path(folder)
    base = folder if root is None else Path(root)
    files = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    return {path.relative_to(base).as_posix(): file_digest(path) for path in files}
