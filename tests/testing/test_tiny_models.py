"""Every tiny model family loads offline, batches mixed image / no-image requests, and supports prefix reuse.

The prefix-reuse test is the procedure LSI extraction relies on: the tokens two framings of a
request share (chat header, image, start of the text) run once with the pixel inputs, their KV
cache is repeated per framing, and only the differing tails run again, without pixels. It must
give the same block outputs as separate full forwards; a deliberately wrong choice of tail
positions must not, which shows the models are sensitive enough for the comparison to mean
something.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache, PreTrainedTokenizerBase
from transformers.utils import is_torchvision_available

from pipeline.models.hooks import find_decoder_layers
from pipeline.models.processors import load_processor
from pipeline.testing.tiny_models import TINY_FAMILIES, build_tiny_model

# Processor outputs that describe tokens; everything else is a pixel input.
TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})
NUM_LAYERS = 4
TOLERANCE = 1e-4

# Each family's prompt for one image and "Hi", generation prompt included.
EXPECTED_PROMPTS = {
    "llava": "USER: <image>\nHi ASSISTANT:",
    "llava_next": "[INST] <image>\nHi [/INST]",
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    ),
    "idefics3": "<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:",
}
EXPECTED_PROMPTS["qwen2_5_vl"] = EXPECTED_PROMPTS["qwen2_vl"]
EXPECTED_PROMPTS["smolvlm"] = EXPECTED_PROMPTS["idefics3"]
IMAGE_PLACEHOLDERS = {
    "llava": "<image>",
    "llava_next": "<image>",
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
}


@dataclass
class Tiny:
    """A built family: its folder, processor (left padding) and model."""

    family: str
    folder: Path
    processor: Any
    model: nn.Module

    @property
    def image_token_id(self) -> int:
        config = self.model.config
        value = getattr(config, "image_token_id", None)
        return int(value if value is not None else config.image_token_index)

    def prompt(self, text: str, with_image: bool) -> str:
        content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def encode(self, texts: Sequence[str], images: Sequence[Image.Image | None]) -> dict[str, torch.Tensor]:
        """A left-padded batch; images nested one list per prompt (empty without), the layout every family takes."""
        prompts = [self.prompt(text, image is not None) for text, image in zip(texts, images, strict=True)]
        nested = [[image] if image is not None else [] for image in images]
        batch = self.processor(text=prompts, images=nested if any(nested) else None, return_tensors="pt", padding=True)
        return dict(batch)

    def position_ids(self, ids: torch.Tensor, mask: torch.Tensor, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(batch, seq)`` positions from the mask, or Qwen's ``(3, batch, seq)`` M-RoPE positions."""
        inner = self.model.model
        if hasattr(inner, "get_rope_index"):
            mm_token_type_ids = (ids == self.image_token_id).int()
            positions, _ = inner.get_rope_index(
                ids, mm_token_type_ids, image_grid_thw=pixels.get("image_grid_thw"), attention_mask=mask
            )
            return positions
        return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _pixels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in batch.items() if key not in TOKEN_KEYS}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module on one intra-op thread.

    The models are too small to gain from more, and on a busy 2-core machine two spinning
    threads made the module 3-4x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tiny_family_folder: Callable[[str], Path]) -> Callable[[str], Tiny]:
    """Load each family's sharp-attention tiny folder once a session, on first use."""
    built: dict[str, Tiny] = {}

    def get(family: str) -> Tiny:
        if family not in built:
            folder = tiny_family_folder(family)
            processor = load_processor(folder)
            processor.tokenizer.padding_side = "left"
            model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
            built[family] = Tiny(family, folder, processor, model.eval())
        return built[family]

    return get


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request: pytest.FixtureRequest, tiny_models: Callable[[str], Tiny]) -> Tiny:
    return tiny_models(request.param)


def _block_outputs(model: nn.Module, forward: Callable[[], Any]) -> tuple[dict[int, torch.Tensor], Any]:
    """Raw outputs of every decoder block during ``forward()``, and what ``forward()`` returned."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for k, block in enumerate(find_decoder_layers(model, NUM_LAYERS)):

        def hook(_module: nn.Module, _inputs: object, output: object, k: int = k) -> None:
            captured[k] = output[0] if isinstance(output, tuple) else output  # type: ignore[index]

        handles.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            result = forward()
    finally:
        for handle in handles:
            handle.remove()
    return captured, result


def test_folder_reloads_offline(tiny: Tiny) -> None:
    config = json.loads((tiny.folder / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == tiny.family
    assert (tiny.folder / "model.safetensors").is_file()
    assert type(tiny.model).__name__ == config["architectures"][0]
    declares_video = "video_processor" in type(tiny.processor).get_attributes() or hasattr(
        tiny.processor, "video_processor"
    )
    try:
        auto = AutoProcessor.from_pretrained(tiny.folder, local_files_only=True)
    except (ImportError, OSError, ValueError):
        # transformers builds video processors on torchvision only; load_processor goes image-only.
        assert declares_video and not is_torchvision_available()
    else:
        assert type(auto).__name__ == type(tiny.processor).__name__
    assert "Pil" in type(tiny.processor.image_processor).__name__ or is_torchvision_available()


def test_chat_template_puts_the_image_first(tiny: Tiny) -> None:
    assert tiny.prompt("Hi", with_image=True) == EXPECTED_PROMPTS[tiny.family]
    assert IMAGE_PLACEHOLDERS[tiny.family] not in tiny.prompt("Hi", with_image=False)


def test_mixed_batch_forward_and_generate(tiny: Tiny) -> None:
    images = [_image(60, 40, 1), None, _image(50, 50, 2)]
    batch = tiny.encode(["What is written here?", "Tell me a story about a cat", "Read it"], images)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert bool(mask[:, -1].all()), "left padding: every prompt ends in the last column"

    image_tokens = (ids == tiny.image_token_id).sum(dim=1).tolist()
    assert image_tokens[1] == 0 and image_tokens[0] > 0 and image_tokens[2] > 0
    with torch.no_grad():
        features = tiny.model.model.get_image_features(**_pixels(batch)).pooler_output
        logits = tiny.model(**batch).logits
    # One feature vector per image token, image by image (Idefics3 / SmolVLM count per prompt).
    counts = [len(f) for f in features] if isinstance(features, (list, tuple)) else [features.shape[0]]
    assert [c for c in counts if c] == [n for n in image_tokens if n]
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()

    generated = tiny.model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape == (3, ids.shape[1] + 3)


def test_a_typography_sized_image_stays_small(tiny: Tiny) -> None:
    batch = tiny.encode(["Read it"], [_image(760, 760, 3)])
    image_tokens = int((batch["input_ids"] == tiny.image_token_id).sum())
    assert 0 < image_tokens <= 100
    assert batch["input_ids"].shape[1] <= 160


def test_pixel_inputs_do_not_depend_on_the_text(tiny: Tiny) -> None:
    images = [_image(60, 40, 1), None]
    first = _pixels(tiny.encode(["Assume this is a benign request: hi", "x"], images))
    second = _pixels(tiny.encode(["Assume this is a malicious request: hi, please", "a longer text"], images))
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_decoder_blocks_found(tiny: Tiny) -> None:
    blocks = find_decoder_layers(tiny.model, NUM_LAYERS)
    decoder = tiny.model.get_decoder()
    assert blocks is decoder.layers
    assert tiny.model.get_output_embeddings() is tiny.model.lm_head


def _prefix_suffix_outputs(tiny: Tiny, texts: list[list[str]], images: list[Image.Image | None], width_start: bool):
    """Block outputs at each prompt's last token: shared prefix once (with pixels), tails per framing.

    ``texts[g][k]`` is framing ``k`` of group ``g``. With ``width_start`` the tails continue from
    the padded prefix width instead of one past each row's largest prefix position (wrong).
    """
    groups, size = len(texts), len(texts[0])
    framings = [tiny.encode([texts[g][k] for g in range(groups)], images) for k in range(size)]
    rows = [
        [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
        for batch in framings
    ]
    lengths = []
    for g in range(groups):
        sequences = [rows[k][g] for k in range(size)]
        n = 0
        while n < min(map(len, sequences)) - 1 and all(s[n] == sequences[0][n] for s in sequences):
            n += 1
        assert not any(tiny.image_token_id in s[n:] for s in sequences), "every image token is in the prefix"
        lengths.append(n)

    pad = tiny.processor.tokenizer.pad_token_id
    width = max(lengths)
    prefix_ids = torch.full((groups, width), pad)
    prefix_mask = torch.zeros((groups, width), dtype=torch.long)
    for g, n in enumerate(lengths):
        prefix_ids[g, width - n :] = torch.tensor(rows[0][g][:n])
        prefix_mask[g, width - n :] = 1
    pixels = _pixels(framings[0])
    prefix_positions = tiny.position_ids(prefix_ids, prefix_mask, pixels)
    cache = DynamicCache(config=tiny.model.config)
    with torch.no_grad():
        tiny.model(
            input_ids=prefix_ids,
            attention_mask=prefix_mask,
            position_ids=prefix_positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **pixels,
        )
    cache.batch_repeat_interleave(size)

    tails = [rows[k][g][lengths[g] :] for g in range(groups) for k in range(size)]
    tail_width = max(map(len, tails))
    tail_ids = torch.full((len(tails), tail_width), pad)
    tail_mask = torch.zeros((len(tails), tail_width), dtype=torch.long)
    for i, tail in enumerate(tails):
        tail_ids[i, : len(tail)] = torch.tensor(tail)
        tail_mask[i, : len(tail)] = 1
    # Text after an image continues one past the largest position on any M-RoPE axis.
    axes = (0, 2) if prefix_positions.dim() == 3 else (1,)
    start = torch.full((groups,), width) if width_start else prefix_positions.amax(dim=axes) + 1
    positions = start.repeat_interleave(size)[:, None] + (tail_mask.cumsum(dim=-1) - 1).clamp(min=0)
    if prefix_positions.dim() == 3:
        positions = positions.unsqueeze(0).expand(prefix_positions.shape[0], -1, -1)
    full_mask = torch.cat([prefix_mask.repeat_interleave(size, dim=0), tail_mask], dim=1)

    def forward() -> Any:
        return tiny.model(
            input_ids=tail_ids,
            attention_mask=full_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )

    outputs, _ = _block_outputs(tiny.model, forward)
    last = tail_mask.sum(dim=1) - 1
    rows_index = torch.arange(len(tails))
    return torch.stack([outputs[k][rows_index, last] for k in range(NUM_LAYERS)], dim=1)


def test_prefix_reuse_matches_full_forwards(tiny: Tiny) -> None:
    questions = ["What is written here?", "How do I do that thing", "Tell me a story"]
    images = [_image(60, 40, 1), _image(50, 50, 2), None]
    framings = ["Assume this is a benign request: {}", "Assume this is a malicious request: {} Please."]
    texts = [[framing.format(q) for framing in framings] for q in questions]

    reference = []
    for group, image in zip(texts, images, strict=True):
        for text in group:
            batch = tiny.encode([text], [image])

            def forward(batch: dict[str, torch.Tensor] = batch) -> Any:
                return tiny.model(**batch, use_cache=False, output_hidden_states=True, logits_to_keep=1)

            outputs, result = _block_outputs(tiny.model, forward)
            states = torch.stack([outputs[k][0, -1] for k in range(NUM_LAYERS)])
            # hidden_states[k + 1] is block k's raw output except for the last block (final norm).
            hidden = result.hidden_states
            for k in range(NUM_LAYERS - 1):
                torch.testing.assert_close(hidden[k + 1][0, -1], states[k], atol=1e-6, rtol=0)
            reference.append(states)
    expected = torch.stack(reference)

    reused = _prefix_suffix_outputs(tiny, texts, images, width_start=False)
    torch.testing.assert_close(reused, expected, atol=TOLERANCE, rtol=0)
    wrong = _prefix_suffix_outputs(tiny, texts, images, width_start=True)
    assert (wrong - expected).abs().max() > 100 * TOLERANCE


def test_builds_are_deterministic_and_leave_the_global_rng_alone(
    tmp_path: Path, tiny_models: Callable[[str], Tiny], gguf_tokenizer: PreTrainedTokenizerBase
) -> None:
    before = torch.get_rng_state()
    folder = build_tiny_model("qwen2_vl", tmp_path / "again", gguf_tokenizer, sharp_attention=True)
    assert torch.equal(torch.get_rng_state(), before)
    again = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    first = tiny_models("qwen2_vl").model.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, first[name]), name


def test_unknown_family_is_refused(tmp_path: Path, gguf_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="unknown tiny model family"):
        build_tiny_model("gpt2", tmp_path, gguf_tokenizer)
