"""Atomic file writes: a temp file beside the target, then ``os.replace``.

Readers never see half a file, and a failed write leaves the previous file untouched. The
durable variants (used by activation stores) also fsync the file and its folder, so the same
holds after a power cut, and name their temp files so that leftovers can be recognised.

JSON-lines files are read here too (:func:`json_lines`), with errors that name the file and line.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def replace_atomic(target: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``target``, then move it into place.

    The temp file is created with the usual permissions (umask applies), not ``mkstemp``'s 0600, so a
    file meant for a team (a saved guard, a run's metrics) is as readable as any other file written here.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_file_beside(target)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
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
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {what}") from None
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


# Durable writes: a SIGKILL or a power cut at any moment leaves either the old file or the new
# one, never a truncated one. Temp files are hidden, named after their target, and recognisable,
# so whoever resumes after a crash can sweep the ones a killed writer left behind.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def _temp_file_beside(target: Path) -> Path:
    """A fresh hidden temp-file name beside ``target``, of the shape :func:`is_temp_name` recognises."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp file of :func:`write_bytes_durable` or :func:`replace_atomic` (a leftover if
    its writer is gone)."""
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
    tmp = _temp_file_beside(path)
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


# Whole folders. DVC empties a stage's outputs before running it unless they are ``persist: true``;
# a persisted folder must then be replaced by its stage as a whole, so that a failure midway leaves
# the previous folder whole and a finished run leaves no stale files in it. The folders beside the
# target are hidden and named after it: ``.<name>.<hex>.new`` (being built), ``.old`` (the previous
# folder during a swap) and ``.bak`` (a copy kept while a stage updates the folder in place).
_NEW, _OLD, _BACKUP = "new", "old", "bak"


def _beside(target: Path, kind: str) -> Path:
    """A fresh hidden name beside ``target`` for a folder of the given kind."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.{kind}")


def _left_beside(target: Path, kind: str) -> list[Path]:
    """Folders of the given kind that a killed run left beside ``target``."""
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.*.{kind}"))


def recover_dir(target: str | Path) -> None:
    """Undo what a killed run of :func:`replace_dir_atomic` or :func:`restore_dir_on_failure` left at ``target``.

    Half-built new folders are removed; a previous folder moved aside by a swap cut short goes back
    into place (or is removed when the new one made it); a folder updated in place under a kept
    copy gets that copy back. Nothing to do after runs that ended, well or with an error.
    """
    target = Path(target)
    for new in _left_beside(target, _NEW):
        shutil.rmtree(new)
    for old in _left_beside(target, _OLD):
        if target.exists():
            shutil.rmtree(old)
        else:
            rename_durable(old, target)
    for backup in _left_beside(target, _BACKUP):
        _put_back(backup, target)


def _put_back(backup: Path, target: Path) -> None:
    """Replace ``target`` (if any) by ``backup``."""
    if target.exists():
        spoiled = _beside(target, _NEW)
        rename_durable(target, spoiled)
        rename_durable(backup, target)
        shutil.rmtree(spoiled)
    else:
        rename_durable(backup, target)


@contextmanager
def replace_dir_atomic(target: str | Path) -> Iterator[Path]:
    """Yield a new empty hidden folder beside ``target``; when the block ends without an error, swap it into place.

    An error in the block removes the new folder and leaves ``target`` exactly as it was. The swap
    is two renames on one file system (the old folder aside, the new one in), then the old folder
    is removed; a run killed at any moment is undone by :func:`recover_dir`, which runs first.
    """
    target = Path(target)
    recover_dir(target)
    make_dirs_durable(target.parent)
    new = _beside(target, _NEW)
    new.mkdir()
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    old = _beside(target, _OLD)
    if target.exists():
        rename_durable(target, old)
    rename_durable(new, target)
    if old.exists():
        shutil.rmtree(old)


def _current_umask() -> int:
    """The process's umask (read by setting it and putting it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_to_umask(folder: str | Path) -> None:
    """Give every file and folder under ``folder`` (itself included) the permissions the umask allows.

    For folders written by a library that makes some files owner-only (``save_pretrained`` writes
    its safetensors 0600): on a shared file system a colleague could not read them.
    """
    mask = _current_umask()
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link a file (instant, no space), or copy it where the file system has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextmanager
def restore_dir_on_failure(folder: str | Path) -> Iterator[None]:
    """Let the block update ``folder`` in place; if it raises, put the folder back exactly as it was.

    For writers that record their output's own paths (an index naming its images), which cannot
    build in a folder of another name. A hard-linked copy is kept during the block, so the writer
    must replace files (``replace_atomic``, ``os.replace``, unlink) rather than rewrite them in
    place, as every writer in this module does.
    """
    folder = Path(folder)
    recover_dir(folder)
    if not folder.exists():
        try:
            yield
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # nothing was there before
            raise
        return
    backup = _beside(folder, _BACKUP)
    shutil.copytree(folder, backup, symlinks=True, copy_function=_link_or_copy)
    try:
        yield
    except BaseException:
        _put_back(backup, folder)
        raise
    shutil.rmtree(backup)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
