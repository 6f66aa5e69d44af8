"""Atomic and durable file writes, and reading JSON-lines text into records."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pipeline.io import (
    is_temp_name,
    json_lines,
    jsonl_lines,
    jsonl_text,
    make_dirs_durable,
    rename_durable,
    replace_atomic,
    write_bytes_atomic,
    write_bytes_durable,
    write_json_atomic,
    write_jsonl_atomic,
)


def test_durable_write_replaces_in_one_step(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file"
    write_bytes_durable(target, b"first")
    write_bytes_durable(target, memoryview(b"second"))
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["file"]


def test_exclusive_durable_write_refuses_an_existing_file(tmp_path: Path) -> None:
    write_bytes_durable(tmp_path / "f", b"kept")
    with pytest.raises(FileExistsError):
        write_bytes_durable(tmp_path / "f", b"new", exclusive=True)
    assert (tmp_path / "f").read_bytes() == b"kept" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_failed_durable_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_bytes_durable(tmp_path / "f", b"old")

    def interrupted(file: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.io._sync_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_durable(tmp_path / "f", b"new")
    assert (tmp_path / "f").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_temp_names_are_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr("pipeline.io._sync_file", lambda file: seen.append(Path(file.name).name))
    write_bytes_durable(tmp_path / "zarr.json", b"{}")
    assert len(seen) == 1 and is_temp_name(seen[0]) and seen[0].startswith(".zarr.json.")
    assert not is_temp_name("zarr.json") and not is_temp_name(".hidden.tmp") and not is_temp_name("0")


def test_make_dirs_and_rename(tmp_path: Path) -> None:
    make_dirs_durable(tmp_path / "x" / "y")
    make_dirs_durable(tmp_path / "x" / "y")  # already there: fine
    rename_durable(tmp_path / "x", tmp_path / "z")
    assert (tmp_path / "z" / "y").is_dir() and not (tmp_path / "x").exists()


def test_jsonl_records_keep_raw_line_separators_inside_strings(tmp_path: Path) -> None:
    # U+2028, U+2029 and U+0085 are legal raw in JSON strings; str.splitlines() would cut these records.
    records = [{"text": "a\u2028b"}, {"text": "c\u2029d"}, {"text": "e\x85f"}, {"text": "plain"}]
    write_jsonl_atomic(tmp_path / "r.jsonl", records)
    text = (tmp_path / "r.jsonl").read_text(encoding="utf-8")
    assert "\u2028" in text and len(text.splitlines()) > len(records)  # the trap this guards against
    assert [json.loads(line) for line in jsonl_lines(text)] == records


def test_jsonl_lines_keep_blank_lines_for_numbering_and_drop_crlf() -> None:
    assert jsonl_lines('{"a": 1}\r\n\n{"b": 2}\n') == ['{"a": 1}', "", '{"b": 2}']
    assert jsonl_lines('{"a": 1}') == ['{"a": 1}']
    assert jsonl_lines("") == []
    assert jsonl_lines(jsonl_text([{"x": "\n inside"}])) == ['{"x": "\\n inside"}']


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    write_bytes_atomic(target, b"one")
    write_bytes_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_an_atomic_write_has_the_umask_s_permissions_and_its_temp_name_is_recognised(tmp_path: Path) -> None:
    # A saved guard or a run's metrics are read by a team: not mkstemp's owner-only 0600.
    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "guard.json", {"tau": 0.5})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "guard.json").stat().st_mode) == 0o644

    seen: list[str] = []

    def fail(tmp: Path) -> None:
        seen.append(tmp.name)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomic(tmp_path / "guard.json", fail)
    assert is_temp_name(seen[0])  # a leftover of a killed write is known for what it is
    assert [p.name for p in tmp_path.iterdir()] == ["guard.json"]
    assert json.loads((tmp_path / "guard.json").read_text()) == {"tau": 0.5}


class _BadLine(ValueError):
    """The error a test asks json_lines to raise."""


def test_json_lines_skip_blank_lines_and_name_file_and_line_in_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('\ufeff{"a": 1}\n\n[2]\n', encoding="utf-8")
    assert list(json_lines(good, _BadLine, "test file")) == [(1, f"{good}:1", {"a": 1}), (3, f"{good}:3", [2])]
    with pytest.raises(_BadLine, match=r"absent\.jsonl: no such test file"):
        list(json_lines(tmp_path / "absent.jsonl", _BadLine, "test file"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(_BadLine, match=r"broken\.jsonl:2: invalid JSON"):
        list(json_lines(broken, _BadLine, "test file"))
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"a": {"b": ["ok", "x\\udc00"]}}\n', encoding="utf-8")
    with pytest.raises(_BadLine, match=r"surrogate\.jsonl:1: field 'a\.b\[1\]' holds a lone surrogate \(\\udc00\)"):
        list(json_lines(surrogate, _BadLine, "test file"))
