"""Tiny, randomly initialised vision-language models saved as ordinary local model folders.

Tests and the pipeline's end-to-end run on a laptop need real checkpoints of each supported
architecture to load through :class:`~pipeline.models.hf_vlm.HFVisionLanguageAdapter`, but not
useful ones. :func:`build_tiny_model` builds one per family in well under a second from configs:
a 1-2 layer vision tower on images of a few dozen pixels, a 4-layer language model with hidden
size 64, and the family's own processor and chat format. Each folder is laid out like the
downloaded hub model, so the code under test takes the same path as with the real one.

Families (``model_type`` in ``config.json``):

- ``llava``: LLaVA-1.5 (CLIP 32 px, 16 image tokens, "USER: <image>\\n... ASSISTANT:").
- ``llava_next``: LLaVA-NeXT anyres tiling on a tiny pinpoint grid (mistral "[INST] ... [/INST]").
- ``qwen2_vl`` / ``qwen2_5_vl``: dynamic resolution capped at 48x48 px (at most 9 image tokens),
  3-D M-RoPE, ChatML with ``<|vision_start|><|image_pad|><|vision_end|>``.
- ``idefics3`` / ``smolvlm``: image splitting into 32 px tiles of 4 tokens each, plus a global
  image, ``<fake_token_around_image>`` and ``<global-img>``, "User:<image>...<end_of_utterance>".

The Qwen and SmolVLM processors declare a video processor, which transformers can only build
with torchvision, so ``AutoProcessor`` cannot load them without it;
:func:`pipeline.models.processors.load_processor` then
loads them image-only. The folders also record the video processor settings a hub save holds,
for machines with torchvision (untested here). SmolVLM's processor needs ``num2words``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from pipeline.testing.tiny_common import (
    IMAGE_SIZE,
    IMAGE_TOKEN,
    LLAVA_15_CHAT_TEMPLATE,
    LLAVA_NEXT_CHAT_TEMPLATE,
    PATCH_SIZE,
    clip_vision_config,
    llama_config,
    save_model_folder,
    tokenizer_copy,
    tokenizer_with_image_token,
)
from pipeline.testing.tiny_idefics import build_tiny_idefics3, build_tiny_smolvlm
from pipeline.testing.tiny_qwen import build_tiny_qwen2_5_vl, build_tiny_qwen2_vl

TINY_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")


def tiny_llava_config(tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """Config of a tiny LLaVA whose vocabulary (``<image>`` included) matches ``tokenizer``."""
    return LlavaConfig(
        vision_config=clip_vision_config(),
        text_config=llama_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def tiny_llava_processor(
    tokenizer: PreTrainedTokenizerBase, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE
) -> LlavaProcessor:
    """LLaVA-1.5 style processor for ``image_size`` px images around an ``<image>``-aware ``tokenizer``."""
    # The PIL backend needs no torchvision and gives the same pixels on every machine.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    # CLIP prepends a class token that the "default" strategy drops again: without the +1 the
    # processor would write one image token fewer than the vision tower yields features.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_15_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_tiny_llava(folder: Path, tokenizer: PreTrainedTokenizerBase, *, sharp_attention: bool = False) -> Path:
    """Write a tiny random LLaVA model and its processor to ``folder``; return ``folder``.

    ``tokenizer`` is any Hugging Face tokenizer (the embedded default model's, in tests); a
    copy of it gains the ``<image>`` token. Weights come from a fixed seed, so the same
    tokenizer always gives the same model, and the global random state is left as it was.
    ``sharp_attention`` draws the language model's query and key weights wide enough that
    position ids matter measurably (see :data:`ATTENTION_INIT_STD`).
    """
    tokenizer = tokenizer_with_image_token(tokenizer)
    config = tiny_llava_config(tokenizer)
    processor = tiny_llava_processor(tokenizer)
    return save_model_folder(
        folder, tokenizer, lambda: LlavaForConditionalGeneration(config), processor, sharp_attention
    )


# --- LLaVA-NeXT ------------------------------------------------------------------------------

# Anyres tiles of 32 px: an image is resized onto the best of these grids (1x2, 2x1 or 2x2 tiles),
# each tile encoded like a LLaVA-1.5 image, plus one downscaled base image.
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build_tiny_llava_next(folder: Path, tokenizer: PreTrainedTokenizerBase, *, sharp_attention: bool = False) -> Path:
    """Write a tiny random LLaVA-NeXT (anyres, 32 px tiles) and its processor to ``folder``."""
    tokenizer = tokenizer_copy(tokenizer, (IMAGE_TOKEN,), LLAVA_NEXT_CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=clip_vision_config(),
        text_config=llama_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    return save_model_folder(
        folder, tokenizer, lambda: LlavaNextForConditionalGeneration(config), processor, sharp_attention
    )


# --- Qwen2-VL and Qwen2.5-VL -----------------------------------------------------------------


BUILDERS: dict[str, Callable[..., Path]] = {
    "llava": build_tiny_llava,
    "llava_next": build_tiny_llava_next,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "idefics3": build_tiny_idefics3,
    "smolvlm": build_tiny_smolvlm,
}


def build_tiny_model(
    family: str, folder: Path, tokenizer: PreTrainedTokenizerBase, *, sharp_attention: bool = False
) -> Path:
    """Write a tiny random model of ``family`` (one of :data:`TINY_FAMILIES`) and its processor to ``folder``.

    ``tokenizer`` is any Hugging Face tokenizer; a copy gains the family's special tokens and
    chat template. Weights come from a fixed seed and the global random state is left as it was.
    Tests that check position ids (prefix reuse, padding) want ``sharp_attention=True``: with the
    default init, wrong positions change block outputs by only ~1e-4 (see :data:`ATTENTION_INIT_STD`).
    """
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    return BUILDERS[family](folder, tokenizer, sharp_attention=sharp_attention)
