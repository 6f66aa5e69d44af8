"""DVC stage ``convert_model``: turn the shipped SmolLM2 GGUF into a safetensors folder, once.

Only the embedded default needs this. For a Hugging Face model folder the stage writes a small
note, ``data/model/external_model.json``, so the stage has its output either way.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from pipeline.config import load_params
from pipeline.io import write_json_atomic
from pipeline.layout import MODEL_NOTE
from pipeline.models.embedded import convert_gguf_to_folder
from stages import run_stage


def main() -> None:
    """Convert into a temporary folder beside the target and rename it into place when complete."""
    params = load_params()
    if params.model.kind != "embedded":
        write_json_atomic(MODEL_NOTE, {"kind": params.model.kind, "path": params.model.path})
        print(f"model.kind is {params.model.kind!r}: nothing to convert (using {params.model.path})")
        return
    target = Path(params.model.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its folder is 0700, and the model folder is shared (the umask applies here).
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        convert_gguf_to_folder(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"converted default model -> {target}")


if __name__ == "__main__":
    run_stage(main)
