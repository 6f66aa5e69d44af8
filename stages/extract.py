"""DVC stage ``extract``: the model's forward passes, once, into a Zarr activation store."""

from __future__ import annotations

import shutil

from pipeline.config import load_params
from pipeline.extraction import extract_to_store
from pipeline.models.registry import load_adapter
from stages.common import INDEX, STORE, run_stage


def main() -> None:
    """Extract every indexed request's states into a fresh store, then move it into place."""
    from pipeline.dataset import read_index

    params = load_params()
    index = read_index(INDEX)
    adapter = load_adapter(params.model)
    # Written beside the target and renamed when complete: a killed run never leaves a store
    # that looks finished, and an earlier good store is only replaced by a finished one.
    partial = STORE.with_name(STORE.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    extract_to_store(adapter, index, params.prompts, params.extract, partial)
    if STORE.exists():
        shutil.rmtree(STORE)
    partial.rename(STORE)
    print(f"stored {len(index)} rows x {len(params.extract.layers)} layers -> {STORE}")


if __name__ == "__main__":
    run_stage(main)
