"""Atomic file writes: a temp file beside the target, then ``os.replace``.

Readers never see half a file, and a failed write leaves the previous file untouched. The
durable variants (used by activation stores) also fsync the file and its folder, so the same
holds after a power cut, and name their temp files so that leftovers can be recognised.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO


def replace_atomic(target: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``target``, then move it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    replace_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, value: Any) -> None:
    """One JSON document (indented, keys sorted), atomically."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def jsonl_lines(text: str) -> list[str]:
    """The records of JSON-lines ``text``: split on ``"\\n"`` only, blank lines kept (numbering stays true).

    Not ``str.splitlines()``: that also splits on U+2028, U+2029 and U+0085, which JSON allows
    raw inside strings (``jsonl_text`` writes them so), and would cut such a record in two.
    A ``"\\r"`` before the ``"\\n"`` (a file saved with Windows line ends) is dropped.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last record starts no new one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def jsonl_text(records: Iterable[Mapping[str, Any]]) -> str:
    """One JSON object per line, non-ASCII kept as is."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_jsonl_atomic(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, atomically."""
    write_text_atomic(path, jsonl_text(records))


# Durable writes: a SIGKILL or a power cut at any moment leaves either the old file or the new
# one, never a truncated one. Temp files are hidden, named after their target, and recognisable,
# so whoever resumes after a crash can sweep the ones a killed writer left behind.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp file of :func:`write_bytes_durable` (a leftover if its writer is gone)."""
    return _TEMP_NAME.match(name) is not None


def _sync_file(file: BinaryIO) -> None:
    """Push a file's bytes to the disk before it is renamed into place."""
    file.flush()
    os.fsync(file.fileno())


def fsync_dir(folder: str | Path) -> None:
    """Make renames and new entries in ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(folder: str | Path) -> None:
    """``mkdir -p`` whose new folders survive a power cut (each one synced into its parent)."""
    folder = Path(folder)
    missing: list[Path] = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_dir(new.parent)


def write_bytes_durable(path: str | Path, data: bytes | memoryview, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` through a synced temp file and a rename; ``exclusive`` refuses an existing file.

    The temp file is created with the usual permissions (umask applies), unlike ``mkstemp``'s 0600.
    """
    path = Path(path)
    make_dirs_durable(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as file:
            file.write(data)
            _sync_file(file)
        if exclusive:
            os.link(tmp, path)  # raises FileExistsError instead of replacing
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def rename_durable(source: str | Path, target: str | Path) -> None:
    """Rename a file or folder (atomic on one file system) and sync the folder that holds them."""
    os.rename(source, target)
    fsync_dir(Path(target).parent)
