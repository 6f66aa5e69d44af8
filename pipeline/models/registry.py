"""Pick and load the adapter that ``params.yaml``'s ``model`` section names."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DEFAULT_LIMITS, ModelConfig
from pipeline.models.base import ModelAdapter


def load_adapter(
    config: ModelConfig, max_request_tokens: int | None = DEFAULT_LIMITS.max_request_tokens
) -> ModelAdapter:
    """Load the embedded default or a Hugging Face image-text-to-text model from a local folder.

    The adapter refuses requests whose user turn is longer than ``max_request_tokens`` tokens.
    """
    # Each adapter is imported only when asked for: the embedded one brings the OCR engine.
    if config.kind == "embedded":
        from pipeline.models.embedded import EmbeddedAdapter

        return EmbeddedAdapter.from_folder(
            Path(config.path),
            dtype=config.dtype,
            device=config.device,
            ocr_cache=Path(config.ocr_cache),
            max_request_tokens=max_request_tokens,
        )
    from pipeline.models.hf_vlm import HFVisionLanguageAdapter

    return HFVisionLanguageAdapter.from_folder(
        Path(config.path), dtype=config.dtype, device=config.device, max_request_tokens=max_request_tokens
    )
