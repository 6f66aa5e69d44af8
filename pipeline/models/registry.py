"""Pick and load the adapter that ``params.yaml``'s ``model`` section names."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ModelConfig
from pipeline.models.base import ModelAdapter


def load_adapter(config: ModelConfig) -> ModelAdapter:
    """Load the embedded default or a Hugging Face image-text-to-text model from a local folder."""
    # Each adapter is imported only when asked for: the embedded one brings the OCR engine.
    if config.kind == "embedded":
        from pipeline.models.embedded import EmbeddedAdapter

        return EmbeddedAdapter.from_folder(
            Path(config.path), dtype=config.dtype, device=config.device, ocr_cache=Path(config.ocr_cache)
        )
    from pipeline.models.hf_vlm import HFVisionLanguageAdapter

    return HFVisionLanguageAdapter.from_folder(Path(config.path), dtype=config.dtype, device=config.device)
