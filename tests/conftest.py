"""Shared fixtures: models are built once per test session, offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.models.hf_vlm import HFVisionLanguageAdapter
from pipeline.models.smollm2_files import find_smollm2_gguf
from pipeline.testing.tiny_models import TINY_FAMILIES, build_tiny_llava, build_tiny_model
from tests.paths import PROJECT_ROOT


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
def tiny_family_folder(
    tmp_path_factory: pytest.TempPathFactory, gguf_tokenizer: PreTrainedTokenizerBase
) -> Callable[[str], Path]:
    """Tiny random model folders per family (``pipeline.testing.tiny_models.TINY_FAMILIES``), built on first use.

    Their attention is sharp: wrong position ids then change block outputs far beyond the
    equivalence tests' tolerance, which the usual near-uniform random attention would not.
    """
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            built[family] = build_tiny_model(family, folder, gguf_tokenizer, sharp_attention=True)
        return built[family]

    return get


@pytest.fixture(scope="session")
def embedded_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default model, converted from the shipped GGUF (tens of seconds: slow tests only)."""
    from pipeline.models.embedded import convert_gguf_to_folder

    cached = PROJECT_ROOT / "data" / "model" / "smollm2-135m"
    if (cached / "lsi_guard_model.json").is_file():
        return cached  # the pipeline already converted it; reading is enough
    return convert_gguf_to_folder(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_adapter(
    request: pytest.FixtureRequest, tiny_family_folder: Callable[[str], Path]
) -> HFVisionLanguageAdapter:
    """Each supported family's tiny model behind its adapter, with sharp attention so wrong positions would show."""
    from pipeline.models.hf_vlm import HFVisionLanguageAdapter

    return HFVisionLanguageAdapter.from_folder(tiny_family_folder(request.param), dtype="float32", device="cpu")
