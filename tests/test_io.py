"""Atomic and durable file writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.io import is_temp_name, make_dirs_durable, rename_durable, write_bytes_durable


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
