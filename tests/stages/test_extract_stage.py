"""The extract stage and its store swap (pipeline.detect.store_swap): a failed or killed run loses nothing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from pipeline.detect import store_swap
from pipeline.detect.extraction import extract_to_store
from pipeline.detect.features import states_for_requests
from pipeline.detect.store import ActivationStore
from pipeline.io import rename_durable
from stages import extract as extract_stage
from stages import run_stage


def write_index(root: Path, image: Path, text: str = "request") -> None:
    rows = [
        {
            "row_id": i,
            "text": f"{text} {i}",
            "image_path": str(image) if i % 2 else None,
            "split": "train",
            "label": i % 2,
        }
        for i in range(6)
    ]
    folder = root / "data" / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(folder / "index.parquet")


def write_params(model_folder: Path, batch_size: int, shard_rows: int) -> None:
    """params.yaml in the current folder: the tiny LLaVA on CPU, layers 1 and 3."""
    params = {
        "model": {"kind": "hf", "path": str(model_folder), "device": "cpu"},
        "extract": {"layers": [1, 3], "batch_size": batch_size, "shard_rows": shard_rows},
        "train": {"fusion_layer": 3, "safety_layer": 1},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))


def test_failed_extraction_keeps_the_previous_store(
    tiny_llava_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tiny_llava_folder, batch_size=4, shard_rows=4)
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(good)
    monkeypatch.setattr(extract_stage, "read_index", lambda path: pl.read_parquet(path).sort("row_id"))

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


class SimulatedKill(BaseException):
    """Stands for a SIGKILL at one point of the stage: nothing after it runs."""


class CountingStates:
    """``states_for_requests`` counting the rows it computes, failing (as a bad image would) on one call."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls, self.rows, self.fail_on_call = 0, 0, fail_on_call

    def __call__(self, adapter: Any, requests: Any, *args: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise ValueError("cannot read this image")
        self.rows += len(requests)
        return states_for_requests(adapter, requests, *args)


@pytest.fixture
def stage_dir(tiny_llava_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with params and a 6-row index, as the current directory."""
    monkeypatch.chdir(tmp_path)
    write_params(tiny_llava_folder, batch_size=2, shard_rows=2)
    image = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    write_index(tmp_path, image)
    monkeypatch.setattr(extract_stage, "read_index", lambda path: pl.read_parquet(path).sort("row_id"))
    return tmp_path


def expected_states(root: Path, name: str) -> np.ndarray:
    """States of the current index and params, extracted straight into a store of their own."""
    from pipeline.config import load_params
    from pipeline.models.registry import load_adapter

    params = load_params()
    index = pl.read_parquet(extract_stage.INDEX).sort("row_id")
    path = root / name
    extract_to_store(load_adapter(params.model), index, params.prompts, params.extract, path, progress=False)
    return ActivationStore.open(path).group["states"][:]


def test_stage_resumes_a_killed_run(stage_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.detect.extraction.states_for_requests", CountingStates(fail_on_call=3))
    with pytest.raises(SystemExit):
        run_stage(extract_stage.main)  # shards [0, 2) [2, 4) written, [4, 6) not
    partial = store_swap.partial_path(extract_stage.STORE)
    assert ActivationStore.open(partial, require_complete=False).written_shards() == [0, 1]

    resumed = CountingStates()
    monkeypatch.setattr("pipeline.detect.extraction.states_for_requests", resumed)
    run_stage(extract_stage.main)
    assert resumed.rows == 2 and not partial.exists()
    monkeypatch.setattr("pipeline.detect.extraction.states_for_requests", states_for_requests)
    states = ActivationStore.open(extract_stage.STORE).group["states"][:]
    assert np.array_equal(states, expected_states(stage_dir, "direct.zarr"))


@pytest.mark.parametrize(
    ("kill_point", "rows_recomputed"),
    [("before_swap", 0), ("between_renames", 0), ("before_removal", 6), ("mid_removal", 6)],
)
def test_swap_killed_at_any_point_is_recovered(
    stage_dir: Path, monkeypatch: pytest.MonkeyPatch, kill_point: str, rows_recomputed: int
) -> None:
    store = extract_stage.STORE
    partial, old = store_swap.partial_path(store), store_swap.old_path(store)
    run_stage(extract_stage.main)
    old_states = ActivationStore.open(store).group["states"][:]
    write_index(stage_dir, stage_dir / "good.png", text="question")  # new inputs: a new store is due
    new_states = expected_states(stage_dir, "direct.zarr")

    renames: list[Path] = []

    def rename(source: Path, target: Path) -> None:
        renames.append(source)
        if (kill_point, len(renames)) in {("before_swap", 1), ("between_renames", 2)}:
            raise SimulatedKill
        rename_durable(source, target)

    def rmtree(folder: Path) -> None:
        if kill_point == "mid_removal":
            next(p for p in folder.rglob("*") if p.is_file()).unlink()
        raise SimulatedKill

    with monkeypatch.context() as patch:
        patch.setattr(store_swap, "rename_durable", rename)
        patch.setattr(store_swap, "shutil", SimpleNamespace(rmtree=rmtree))
        with pytest.raises(SimulatedKill):
            extract_stage.main()
    # what the kill left: the old store in place or put aside, and the new one complete beside it
    in_place = ActivationStore.open(store) if store.exists() else None
    if kill_point in ("before_swap", "between_renames"):
        assert ActivationStore.open(partial).is_complete
        aside = in_place or ActivationStore.open(old)
        assert np.array_equal(aside.group["states"][:], old_states)
    else:
        assert in_place is not None and np.array_equal(in_place.group["states"][:], new_states)

    counting = CountingStates()
    monkeypatch.setattr("pipeline.detect.extraction.states_for_requests", counting)
    run_stage(extract_stage.main)
    assert counting.rows == rows_recomputed  # a complete partial is swapped in as it is
    assert np.array_equal(ActivationStore.open(store).group["states"][:], new_states)
    assert sorted(p.name for p in store.parent.iterdir()) == ["store.zarr"]
