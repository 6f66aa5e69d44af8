"""A tiny, randomly initialised LLaVA saved as an ordinary local model folder.

Tests and the pipeline's end-to-end run on a laptop need a real ``llava`` checkpoint to load
through :class:`~pipeline.models.hf_vlm.HFVisionLanguageAdapter`, but not a useful one. This
module builds one in well under a second from configs: a 2-layer CLIP vision tower on 32 px
images, a 4-layer Llama with hidden size 64, and a LLaVA-1.5 style processor. The folder it
writes is laid out exactly like a downloaded ``llava-hf`` model, so the code under test takes
the same path as with the real one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
SEED = 0

# LLaVA-1.5's conversation format ("USER: <image>\n{text} ASSISTANT:"), as in llava-hf's
# template: images of a turn first, then its texts, each text followed by a space.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _tokenizer_with_image_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of ``tokenizer`` that knows ``<image>`` as a special token and has a pad token.

    The caller's tokenizer is left untouched: it may be shared across a test session.
    """
    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = LLAVA_15_CHAT_TEMPLATE
    return tokenizer


def tiny_llava_config(tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """Config of a tiny LLaVA whose vocabulary (``<image>`` included) matches ``tokenizer``."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def tiny_llava_processor(tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    """LLaVA-1.5 style processor for 32 px images around an ``<image>``-aware ``tokenizer``."""
    # The PIL backend needs no torchvision and gives the same pixels on every machine.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    # CLIP prepends a class token that the "default" strategy drops again: without the +1 the
    # processor would write one image token fewer than the vision tower yields features.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_15_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_tiny_llava(folder: Path, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write a tiny random LLaVA model and its processor to ``folder``; return ``folder``.

    ``tokenizer`` is any Hugging Face tokenizer (the embedded default model's, in tests); a
    copy of it gains the ``<image>`` token. Weights come from a fixed seed, so the same
    tokenizer always gives the same model, and the global random state is left as it was.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_with_image_token(tokenizer)
    config = tiny_llava_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # Safetensors is the only format transformers 5 writes.
    model.save_pretrained(folder)
    tiny_llava_processor(tokenizer).save_pretrained(folder)
    return folder
