"""Tiny Idefics3 and SmolVLM models: 32 px tiles of 4 tokens each plus a global image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    PreTrainedTokenizerBase,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
    SmolVLMVisionConfig,
)

from pipeline.models.processors import make_processor
from pipeline.testing.tiny_common import (
    IDEFICS3_CHAT_TEMPLATE,
    IDEFICS3_IMAGE_SEQ_LEN,
    IDEFICS3_LONGEST_EDGE,
    IDEFICS3_SCALE_FACTOR,
    IDEFICS3_SPECIAL_TOKENS,
    IMAGE_SIZE,
    IMAGE_TOKEN,
    PATCH_SIZE,
    add_video_processor_config,
    llama_config,
    save_model_folder,
    tokenizer_copy,
)


def _idefics3_image_processor_kwargs() -> dict[str, Any]:
    return {
        "do_image_splitting": True,
        "size": {"longest_edge": IDEFICS3_LONGEST_EDGE},
        "max_image_size": {"longest_edge": IMAGE_SIZE},
    }


def _idefics3_vision_sizes() -> dict[str, Any]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }


def _idefics3_layout(
    tokenizer: PreTrainedTokenizerBase, config_class: type, vision_config_class: type
) -> tuple[PreTrainedTokenizerBase, Any]:
    """The tokenizer copy and config Idefics3 and SmolVLM share (same layout, different classes)."""
    tokenizer = tokenizer_copy(tokenizer, IDEFICS3_SPECIAL_TOKENS, IDEFICS3_CHAT_TEMPLATE)
    config = config_class(
        vision_config=vision_config_class(**_idefics3_vision_sizes()),
        text_config=llama_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=IDEFICS3_SCALE_FACTOR,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, config


def build_tiny_idefics3(folder: Path, tokenizer: PreTrainedTokenizerBase, *, sharp_attention: bool = False) -> Path:
    """Write a tiny random Idefics3 (32 px tiles of 4 tokens, image splitting) and its processor to ``folder``."""
    tokenizer, config = _idefics3_layout(tokenizer, Idefics3Config, Idefics3VisionConfig)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(**_idefics3_image_processor_kwargs()),
        tokenizer=tokenizer,
        image_seq_len=IDEFICS3_IMAGE_SEQ_LEN,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    return save_model_folder(
        folder, tokenizer, lambda: Idefics3ForConditionalGeneration(config), processor, sharp_attention
    )


def build_tiny_smolvlm(folder: Path, tokenizer: PreTrainedTokenizerBase, *, sharp_attention: bool = False) -> Path:
    """Write a tiny random SmolVLM (Idefics3's layout, SmolVLM's classes) and its processor to ``folder``.

    SmolVLM's processor needs the ``num2words`` package (it spells out video frame counts).
    """
    tokenizer, config = _idefics3_layout(tokenizer, SmolVLMConfig, SmolVLMVisionConfig)
    processor = make_processor(
        SmolVLMProcessor,
        image_processor=SmolVLMImageProcessorPil(**_idefics3_image_processor_kwargs()),
        tokenizer=tokenizer,
        image_seq_len=IDEFICS3_IMAGE_SEQ_LEN,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    folder = save_model_folder(
        folder, tokenizer, lambda: SmolVLMForConditionalGeneration(config), processor, sharp_attention
    )
    video = {
        "video_processor_type": "SmolVLMVideoProcessor",
        "size": {"longest_edge": IDEFICS3_LONGEST_EDGE},
        "max_image_size": {"longest_edge": IMAGE_SIZE},
    }
    add_video_processor_config(folder, video)
    return folder
