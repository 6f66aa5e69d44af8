"""The ``convert_model`` stage: the model folder is built beside its target and swapped in whole."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stages import convert_model

TARGET = Path("data/model/smollm2-135m")


def fake_conversion(folder: Path) -> Path:
    """What the stage's conversion writes, in miniature (the real one takes seconds and 500 MB)."""
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"weights")
    weights.chmod(0o600)  # as transformers' save_pretrained leaves it
    return folder


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with default params, as the working folder, converting with :func:`fake_conversion`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("")
    monkeypatch.setattr(convert_model, "convert_gguf_to_folder", fake_conversion)
    return tmp_path


@pytest.mark.usefixtures("project")
def test_the_model_folder_is_swapped_in_whole_with_the_umask_s_permissions() -> None:
    previous = os.umask(0o022)
    try:
        convert_model.main()
        (TARGET / "stale.bin").write_text("from an earlier conversion")
        convert_model.main()  # again: the earlier folder is replaced, not merged into
    finally:
        os.umask(previous)
    # A shared model folder: not mkdtemp's owner-only 0700.
    assert stat.S_IMODE(TARGET.stat().st_mode) == 0o755
    # Every file readable by the group and others too, the weights included.
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in TARGET.iterdir()} == {
        "config.json": 0o644,
        "model.safetensors": 0o644,
    }
    assert sorted(p.name for p in TARGET.parent.iterdir()) == ["smollm2-135m"]


@pytest.mark.usefixtures("project")
def test_a_failed_conversion_leaves_the_earlier_folder_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    convert_model.main()

    def broken(folder: Path) -> Path:
        (folder / "config.json").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(convert_model, "convert_gguf_to_folder", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_model.main()
    assert (TARGET / "config.json").read_text() == "{}"
    assert sorted(p.name for p in TARGET.parent.iterdir()) == ["smollm2-135m"]
