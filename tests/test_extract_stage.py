"""The extract stage: a failed run names the rows and leaves the previous store as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from pipeline.store import ActivationStore
from stages import extract as extract_stage
from stages.common import run_stage


def write_index(root: Path, image: Path) -> None:
    rows = [
        {
            "row_id": i,
            "text": f"request {i}",
            "image_path": str(image) if i % 2 else None,
            "split": "train",
            "label": i % 2,
        }
        for i in range(6)
    ]
    folder = root / "data" / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(folder / "index.parquet")


def test_failed_extraction_keeps_the_previous_store(
    tiny_llava_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    params = {
        "model": {"kind": "hf", "path": str(tiny_llava_folder), "device": "cpu"},
        "extract": {"layers": [1, 3], "batch_size": 4, "shard_rows": 4},
        "train": {"fusion_layer": 3, "safety_layer": 1},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(good)
    monkeypatch.setattr("pipeline.dataset.read_index", lambda path: pl.read_parquet(path).sort("row_id"))

    write_index(tmp_path, good)
    run_stage(extract_stage.main)
    before = ActivationStore.open(extract_stage.STORE).states().compute()

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    write_index(tmp_path, broken)
    with pytest.raises(SystemExit) as exit_info:
        run_stage(extract_stage.main)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    last_line = error.strip().splitlines()[-1]
    assert last_line.startswith("error: index rows [") and "broken.png" in last_line
    after = ActivationStore.open(extract_stage.STORE).states().compute()
    np.testing.assert_array_equal(after, before)
