"""What every tiny model family shares: sizes, the image token, tokenizer copies, configs and saving a folder."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from pipeline.models.hooks import find_decoder_layers

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
SEED = 0

# Language model sizes shared by every family: small enough that load + forward take milliseconds.
TEXT_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}

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

# llava-v1.6-mistral's format: "[INST] <image>\n{text} [/INST]", images of a turn first.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for item in message['content'] %}{{ ' ' + item['text'] }}{% endfor %}{% endif %}"
    "{{ '</s>' }}"
    "{% endif %}"
    "{% endfor %}"
)

# Qwen2-VL / Qwen2.5-VL ChatML: a default system prompt, each image as
# <|vision_start|><|image_pad|><|vision_end|> (the processor repeats <|image_pad|>), images
# of a turn before its texts.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Idefics3 / SmolVLM: "<|im_start|>User:<image>{text}<end_of_utterance>\nAssistant:". A turn
# that starts with an image has no space after the colon, as in the hub's templates.
IDEFICS3_CHAT_TEMPLATE = (
    "{{ '<|im_start|>' }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}"
    "{% set images = message['content'] | selectattr('type', 'equalto', 'image') | list %}"
    "{% if images %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in images %}{{ '<image>' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<end_of_utterance>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

QWEN_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IDEFICS3_SPECIAL_TOKENS = (
    "<fake_token_around_image>",
    IMAGE_TOKEN,
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
)

# Qwen2-VL's image processor: 8 px patches merged 2x2, so one image token covers 16x16 px; the
# pixel budget keeps any image (760x760 included) at 1 to 9 tokens.
QWEN_PATCH_SIZE = 8
QWEN_MERGE_SIZE = 2
QWEN_MIN_PIXELS = 16 * 16
QWEN_MAX_PIXELS = 48 * 48
# Idefics3 / SmolVLM: images resized to at most 64 px, split into 32 px tiles (up to 2x2) plus a
# downscaled global image; each 32 px image is 4x4 patches, pixel-shuffled by 2 into 4 tokens.
IDEFICS3_LONGEST_EDGE = 64
IDEFICS3_SCALE_FACTOR = 2
IDEFICS3_IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // IDEFICS3_SCALE_FACTOR**2
# With ``sharp_attention`` the language model's query and key weights are drawn this wide instead
# of the usual 0.02. With the usual init attention is nearly uniform, and moving one token by a
# position changes block outputs by only ~2e-4, so a test at 1e-4 can hardly tell right position
# ids from wrong ones. At 0.2 that change is ~3e-2, on states of ~0.1.
ATTENTION_INIT_STD = 0.2


def tokenizer_copy(
    tokenizer: PreTrainedTokenizerBase, special_tokens: tuple[str, ...], chat_template: str
) -> PreTrainedTokenizerBase:
    """A copy of ``tokenizer`` that knows ``special_tokens``, has a pad token and ``chat_template``.

    The caller's tokenizer is left untouched: it may be shared across a test session.
    """
    tokenizer = copy.deepcopy(tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [token for token in special_tokens if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template
    return tokenizer


def tokenizer_with_image_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of ``tokenizer`` that knows ``<image>`` as a special token and has a pad token."""
    return tokenizer_copy(tokenizer, (IMAGE_TOKEN,), LLAVA_15_CHAT_TEMPLATE)


def token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Vocabulary size and special token ids for a language model config matching ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def llama_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(**TEXT_SIZES, **token_ids(tokenizer))


def clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )


def add_video_processor_config(folder: Path, video_processor: dict[str, Any]) -> None:
    """Record the video processor a hub save would hold, for machines with torchvision.

    Without it ``AutoProcessor`` there would fail to find a video processor configuration.
    """
    path = folder / "processor_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.setdefault("video_processor", video_processor)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@torch.no_grad()
def sharpen_attention(model: nn.Module) -> None:
    """Redraw the language model's query and key projections with :data:`ATTENTION_INIT_STD`."""
    for block in find_decoder_layers(model, model.config.get_text_config().num_hidden_layers):
        attention = block.self_attn
        for projection in (attention.q_proj, attention.k_proj):
            nn.init.normal_(projection.weight, mean=0.0, std=ATTENTION_INIT_STD)


def save_model_folder(
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    make_model: Callable[[], nn.Module],
    processor: ProcessorMixin,
    sharp_attention: bool,
) -> Path:
    """Build the model from a fixed seed (global RNG untouched) and save it with ``processor``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = make_model().eval()
        if sharp_attention:
            sharpen_attention(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # Safetensors is the only format transformers 5 writes.
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# --- LLaVA-1.5 -------------------------------------------------------------------------------
