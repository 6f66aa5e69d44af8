"""Shared fixtures: models are built once per test session, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.models.smollm2_files import find_smollm2_gguf
from pipeline.models.tiny import build_tiny_llava

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_BENCHMARKS = PROJECT_ROOT.parent / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def gguf_tokenizer() -> PreTrainedTokenizerBase:
    """The default model's tokenizer; reading it from the GGUF file takes seconds, so once a session."""
    gguf = find_smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_llava_folder(tmp_path_factory: pytest.TempPathFactory, gguf_tokenizer: PreTrainedTokenizerBase) -> Path:
    """A tiny random LLaVA saved as a local Hugging Face folder."""
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), gguf_tokenizer)


@pytest.fixture(scope="session")
def embedded_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default model, converted from the shipped GGUF (tens of seconds: slow tests only)."""
    from pipeline.models.embedded import convert_gguf_to_folder

    cached = PROJECT_ROOT / "data" / "model" / "smollm2-135m"
    if (cached / "lsi_guard_model.json").is_file():
        return cached  # the pipeline already converted it; reading is enough
    return convert_gguf_to_folder(tmp_path_factory.mktemp("smollm2"))
