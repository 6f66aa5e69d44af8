"""A tiny random stand-in for the embedded default model, for tests: a 3-layer Llama with the
default model's vocabulary behind the real :class:`EmbeddedAdapter`, reading images through a
fixed OCR result instead of the OCR engine."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from pipeline.detect.probe import LSIProbe, ProbeMeta
from pipeline.models.base import ModelInfo
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.ocr import OCRLine, OCRResult

HIDDEN = 64
LAYERS = 3


class FixedReader:
    """An OCR reader that 'reads' the same lines from any image, so tests need no OCR engine."""

    def __init__(self, lines: tuple[OCRLine, ...]) -> None:
        self.result = OCRResult(lines)

    def read(self, path: Path) -> OCRResult:
        return self.result


def tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A random 3-layer Llama with the tokenizer's vocabulary; the seed makes it reproducible."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def tiny_embedded(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, lines: tuple[OCRLine, ...]
) -> EmbeddedAdapter:
    """The embedded adapter around ``model``, every image reading as ``lines``."""
    info = ModelInfo(name="tiny", revision="0", num_layers=LAYERS, hidden_size=HIDDEN, dtype="float32")
    return EmbeddedAdapter(model=model, tokenizer=tokenizer, reader=FixedReader(lines), info=info)  # type: ignore[arg-type]


def tiny_probe(seed: int, fusion_layer: int = 2, safety_layer: int = 1) -> tuple[LSIProbe, ProbeMeta]:
    """A random LSI probe for the tiny model, with metadata that records no store (nothing to match)."""
    return random_probe(HIDDEN, seed, fusion_layer, safety_layer)


def random_probe(hidden: int, seed: int, fusion_layer: int, safety_layer: int) -> tuple[LSIProbe, ProbeMeta]:
    """A seeded random LSI probe of width ``hidden`` (the global RNG left alone); its metadata records no store."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LSIProbe(hidden, alpha=1.0)
    meta = ProbeMeta(
        hidden_size=hidden,
        alpha=1.0,
        fusion_layer=fusion_layer,
        safety_layer=safety_layer,
        best_epoch=0,
        best_val_auroc=1.0,
        store_provenance={},
    )
    return probe, meta
