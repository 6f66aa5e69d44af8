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

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
    SmolVLMVisionConfig,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

from pipeline.models.hooks import find_decoder_layers
from pipeline.models.processors import make_processor

TINY_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")

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


def _tokenizer_copy(
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
    return _tokenizer_copy(tokenizer, (IMAGE_TOKEN,), LLAVA_15_CHAT_TEMPLATE)


def _token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Vocabulary size and special token ids for a language model config matching ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _llama_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(**TEXT_SIZES, **_token_ids(tokenizer))


def _clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )


def _add_video_processor_config(folder: Path, video_processor: dict[str, Any]) -> None:
    """Record the video processor a hub save would hold, for machines with torchvision.

    Without it ``AutoProcessor`` there would fail to find a video processor configuration.
    """
    path = folder / "processor_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.setdefault("video_processor", video_processor)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@torch.no_grad()
def _sharpen_attention(model: nn.Module) -> None:
    """Redraw the language model's query and key projections with :data:`ATTENTION_INIT_STD`."""
    for block in find_decoder_layers(model, model.config.get_text_config().num_hidden_layers):
        attention = block.self_attn
        for projection in (attention.q_proj, attention.k_proj):
            nn.init.normal_(projection.weight, mean=0.0, std=ATTENTION_INIT_STD)


def _save(
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
            _sharpen_attention(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # Safetensors is the only format transformers 5 writes.
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# --- LLaVA-1.5 -------------------------------------------------------------------------------


def tiny_llava_config(tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """Config of a tiny LLaVA whose vocabulary (``<image>`` included) matches ``tokenizer``."""
    return LlavaConfig(
        vision_config=_clip_vision_config(),
        text_config=_llama_config(tokenizer),
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
    return _save(folder, tokenizer, lambda: LlavaForConditionalGeneration(config), processor, sharp_attention)


# --- LLaVA-NeXT ------------------------------------------------------------------------------

# Anyres tiles of 32 px: an image is resized onto the best of these grids (1x2, 2x1 or 2x2 tiles),
# each tile encoded like a LLaVA-1.5 image, plus one downscaled base image.
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build_tiny_llava_next(folder: Path, tokenizer: PreTrainedTokenizerBase, *, sharp_attention: bool = False) -> Path:
    """Write a tiny random LLaVA-NeXT (anyres, 32 px tiles) and its processor to ``folder``."""
    tokenizer = _tokenizer_copy(tokenizer, (IMAGE_TOKEN,), LLAVA_NEXT_CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(),
        text_config=_llama_config(tokenizer),
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
    return _save(folder, tokenizer, lambda: LlavaNextForConditionalGeneration(config), processor, sharp_attention)


# --- Qwen2-VL and Qwen2.5-VL -----------------------------------------------------------------


def _qwen_text_sizes(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    # head_dim 16 gives 8 rotary frequencies, split over the (temporal, height, width) axes.
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
    return {**TEXT_SIZES, **_token_ids(tokenizer), "rope_parameters": rope}


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
    tokenizer = _tokenizer_copy(tokenizer, QWEN_SPECIAL_TOKENS, QWEN2_VL_CHAT_TEMPLATE)
    config = config_for(tokenizer)
    image_kwargs = _qwen_image_processor_kwargs()
    processor = make_processor(
        processor_class,
        image_processor=Qwen2VLImageProcessorPil(**image_kwargs),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    folder = _save(folder, tokenizer, lambda: model_class(config), processor, sharp_attention)
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "patch_size": QWEN_PATCH_SIZE,
        "merge_size": QWEN_MERGE_SIZE,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
    }
    _add_video_processor_config(folder, video)
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
    tokenizer = _tokenizer_copy(tokenizer, IDEFICS3_SPECIAL_TOKENS, IDEFICS3_CHAT_TEMPLATE)
    config = config_class(
        vision_config=vision_config_class(**_idefics3_vision_sizes()),
        text_config=_llama_config(tokenizer),
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
    return _save(folder, tokenizer, lambda: Idefics3ForConditionalGeneration(config), processor, sharp_attention)


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
    folder = _save(folder, tokenizer, lambda: SmolVLMForConditionalGeneration(config), processor, sharp_attention)
    video = {
        "video_processor_type": "SmolVLMVideoProcessor",
        "size": {"longest_edge": IDEFICS3_LONGEST_EDGE},
        "max_image_size": {"longest_edge": IMAGE_SIZE},
    }
    _add_video_processor_config(folder, video)
    return folder


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
