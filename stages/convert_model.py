"""DVC stage ``convert_model``: turn the shipped SmolLM2 GGUF into a safetensors folder, once.

Only the embedded default needs this. For a Hugging Face model folder the stage writes a small
note, ``data/model/external_model.json``, so the stage has its output either way.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params
from pipeline.io import open_to_umask, replace_dir_atomic, write_json_atomic
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
    # Built in a hidden folder beside the target (umask permissions: the model folder is shared) and
    # swapped in whole; a failed or killed conversion leaves the previous folder as it was.
    with replace_dir_atomic(target) as staging:
        convert_gguf_to_folder(staging)
        open_to_umask(staging)  # transformers writes the weights owner-only (0600)
    print(f"converted default model -> {target}")


if __name__ == "__main__":
    run_stage(main)
