"""Tiny Qwen2-VL and Qwen2.5-VL models: dynamic resolution capped at 48x48 px, 3-D M-RoPE, ChatML."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from transformers import (
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

from pipeline.models.processors import make_processor
from pipeline.testing.tiny_common import (
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_MAX_PIXELS,
    QWEN_MERGE_SIZE,
    QWEN_MIN_PIXELS,
    QWEN_PATCH_SIZE,
    QWEN_SPECIAL_TOKENS,
    TEXT_SIZES,
    add_video_processor_config,
    save_model_folder,
    token_ids,
    tokenizer_copy,
)


def _qwen_text_sizes(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    # head_dim 16 gives 8 rotary frequencies, split over the (temporal, height, width) axes.
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
    return {**TEXT_SIZES, **token_ids(tokenizer), "rope_parameters": rope}


def _qwen_vision_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen_image_processor_kwargs() -> dict[str, Any]:
    return {
        "min_pixels": QWEN_MIN_PIXELS,
        "max_pixels": QWEN_MAX_PIXELS,
        "patch_size": QWEN_PATCH_SIZE,
        "merge_size": QWEN_MERGE_SIZE,
        "temporal_patch_size": 2,
    }


def _build_qwen(
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    config_for: Callable[[PreTrainedTokenizerBase], Any],
    model_class: type[nn.Module],
    processor_class: type[ProcessorMixin],
    sharp_attention: bool,
) -> Path:
    tokenizer = tokenizer_copy(tokenizer, QWEN_SPECIAL_TOKENS, QWEN2_VL_CHAT_TEMPLATE)
    config = config_for(tokenizer)
    image_kwargs = _qwen_image_processor_kwargs()
    processor = make_processor(
        processor_class,
        image_processor=Qwen2VLImageProcessorPil(**image_kwargs),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    folder = save_model_folder(folder, tokenizer, lambda: model_class(config), processor, sharp_attention)
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "patch_size": QWEN_PATCH_SIZE,
        "merge_size": QWEN_MERGE_SIZE,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
    }
    add_video_processor_config(folder, video)
    return folder


def _qwen2_vl_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2VLConfig:
    vision = Qwen2VLVisionConfig(
        depth=1,
        embed_dim=32,
        hidden_size=TEXT_SIZES["hidden_size"],  # the patch merger's output feeds the language model
        mlp_ratio=2,
        num_heads=2,
        patch_size=QWEN_PATCH_SIZE,
        spatial_merge_size=QWEN_MERGE_SIZE,
        temporal_patch_size=2,
    )
    text = Qwen2VLTextConfig(**_qwen_text_sizes(tokenizer))
    return Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_vision_ids(tokenizer))


def _qwen2_5_vl_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig:
    # Two vision blocks: block 0 attends within 32 px windows, block 1 over the whole image.
    vision = Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=TEXT_SIZES["hidden_size"],
        patch_size=QWEN_PATCH_SIZE,
        spatial_merge_size=QWEN_MERGE_SIZE,
        temporal_patch_size=2,
        window_size=32,
        fullatt_block_indexes=[1],
    )
    text = Qwen2_5_VLTextConfig(**_qwen_text_sizes(tokenizer))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_vision_ids(tokenizer))


def build_tiny_qwen2_vl(folder: Path, tokenizer: PreTrainedTokenizerBase, *, sharp_attention: bool = False) -> Path:
    """Write a tiny random Qwen2-VL (at most 9 tokens an image, M-RoPE) and its processor to ``folder``."""
    return _build_qwen(
        folder, tokenizer, _qwen2_vl_config, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, sharp_attention
    )


def build_tiny_qwen2_5_vl(folder: Path, tokenizer: PreTrainedTokenizerBase, *, sharp_attention: bool = False) -> Path:
    """Write a tiny random Qwen2.5-VL (windowed vision attention, M-RoPE) and its processor to ``folder``."""
    return _build_qwen(
        folder, tokenizer, _qwen2_5_vl_config, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, sharp_attention
    )


# --- Idefics3 and SmolVLM --------------------------------------------------------------------
