"""Whole-folder writes: a folder built beside its target and swapped in, or updated in place and put back on failure."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from pipeline.io import recover_dir, replace_dir_atomic, restore_dir_on_failure, write_text_atomic


class Midway(RuntimeError):
    """The failure a test injects part way through writing a folder."""


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) with the SHA-256 of its bytes."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def old_folder(parent: Path) -> Path:
    """A previous output: two files, one in a subfolder."""
    target = parent / "out"
    (target / "sub").mkdir(parents=True)
    (target / "a.json").write_text("old a\n")
    (target / "sub" / "b.csv").write_text("old b\n")
    return target


def test_a_finished_block_replaces_the_folder_whole(tmp_path: Path) -> None:
    target = old_folder(tmp_path)
    with replace_dir_atomic(target) as new:
        assert new.parent == tmp_path and new.name.startswith(".out.") and not any(new.iterdir())
        write_text_atomic(new / "a.json", "new a\n")
    # The new folder only: the old subfolder is gone, and nothing is left beside the target.
    assert tree(target) == {"a.json": hashlib.sha256(b"new a\n").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_block_leaves_the_previous_folder_byte_identical(tmp_path: Path) -> None:
    target = old_folder(tmp_path)
    before = tree(target)
    with pytest.raises(Midway), replace_dir_atomic(target) as new:
        write_text_atomic(new / "a.json", "half of the new outputs\n")
        raise Midway("after the first file")
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_first_run_creates_the_folder_and_its_parents(tmp_path: Path) -> None:
    target = tmp_path / "data" / "out"
    with replace_dir_atomic(target) as new:
        (new / "f").write_text("x")
    assert tree(target) == {"f": hashlib.sha256(b"x").hexdigest()}


@pytest.mark.parametrize("target_there", [False, True], ids=["killed-between-renames", "killed-before-cleanup"])
def test_a_swap_cut_short_by_a_kill_is_finished_or_undone(tmp_path: Path, target_there: bool) -> None:
    """A kill after the old folder went aside: it goes back, or, if the new one is in place, it is dropped."""
    target = old_folder(tmp_path)
    before = tree(target)
    old = tmp_path / f".out.{'0' * 32}.old"
    os.rename(target, old)
    half_built = tmp_path / f".out.{'1' * 32}.new"
    half_built.mkdir()
    if target_there:
        target.mkdir()
        (target / "new.json").write_text("new\n")
    recover_dir(target)
    assert tree(target) == ({"new.json": hashlib.sha256(b"new\n").hexdigest()} if target_there else before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_in_place_update_that_fails_is_put_back_byte_identical(tmp_path: Path) -> None:
    target = old_folder(tmp_path)
    before = tree(target)
    with pytest.raises(Midway), restore_dir_on_failure(target):
        write_text_atomic(target / "a.json", "replaced\n")
        write_text_atomic(target / "added.txt", "added\n")
        (target / "sub" / "b.csv").unlink()
        raise Midway("after three changes")
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_in_place_update_that_finishes_is_kept_and_its_copy_dropped(tmp_path: Path) -> None:
    target = old_folder(tmp_path)
    with restore_dir_on_failure(target):
        write_text_atomic(target / "a.json", "replaced\n")
    assert (target / "a.json").read_text() == "replaced\n" and (target / "sub" / "b.csv").read_text() == "old b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_in_place_first_run_that_fails_leaves_no_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(Midway), restore_dir_on_failure(target):
        target.mkdir()
        (target / "partial").write_text("x")
        raise Midway("before the index")
    assert not target.exists()


def test_an_in_place_update_killed_midway_is_put_back_by_the_next_run(tmp_path: Path) -> None:
    """A kill leaves the kept copy beside the folder; the next run starts from the folder as it was."""
    target = old_folder(tmp_path)
    before = tree(target)
    shutil.copytree(target, tmp_path / f".out.{'2' * 32}.bak")  # the copy the killed run kept
    write_text_atomic(target / "a.json", "written by the killed run\n")
    with restore_dir_on_failure(target):
        assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
