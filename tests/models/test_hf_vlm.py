"""The Hugging Face vision-language adapter, exercised on a tiny random LLaVA built offline."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerBase

from pipeline.images import ImageError
from pipeline.models.base import Request
from pipeline.models.hf_vlm import HFVisionLanguageAdapter, ModelLoadError
from pipeline.testing.tiny_models import build_tiny_llava

ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer(gguf_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    return gguf_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tiny_llava_folder: Path) -> Path:
    return tiny_llava_folder


@pytest.fixture(scope="module")
def adapter(tiny_folder: Path) -> HFVisionLanguageAdapter:
    return HFVisionLanguageAdapter.from_folder(tiny_folder, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Images of different content and size, so a mix-up between batch rows would show."""
    folder = tmp_path_factory.mktemp("images")
    red = Image.new("RGB", (50, 40), (220, 30, 30))
    stripes = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(stripes)
    for x in range(0, 64, 8):
        draw.rectangle([x, 0, x + 3, 63], fill=(20, 40, 200))
    grey = Image.linear_gradient("L").resize((40, 70))  # a non-RGB mode on purpose
    paths = {"red": folder / "red.png", "stripes": folder / "stripes.png", "grey": folder / "grey.png"}
    red.save(paths["red"])
    stripes.save(paths["stripes"])
    grey.save(paths["grey"])
    return paths


@pytest.fixture()
def mixed_requests(images: dict[str, Path]) -> list[Request]:
    """Three requests of different lengths: two with different images, one with none."""
    return [
        Request("What is shown here?", images["red"]),
        Request("Write a long and detailed story about a lighthouse keeper who finds a message in a bottle."),
        Request("Describe it.", images["stripes"]),
    ]


def naive_states(adapter: HFVisionLanguageAdapter, requests: Sequence[Request], layers: Sequence[int]) -> torch.Tensor:
    """Reference: one request at a time, full forward, ``hidden_states[k + 1][0, -1]``."""
    rows = []
    for request in requests:
        images = [Image.open(request.image).convert("RGB")] if request.image is not None else None
        batch = adapter.processor(text=[adapter.prompt_text(request)], images=images, return_tensors="pt")
        with torch.inference_mode():
            output = adapter.model(**batch, output_hidden_states=True)
        rows.append(torch.stack([output.hidden_states[k + 1][0, -1] for k in layers]))
    return torch.stack(rows).float()


def test_info_describes_the_model(adapter: HFVisionLanguageAdapter, tiny_folder: Path) -> None:
    info = adapter.info
    assert (info.name, info.num_layers, info.hidden_size, info.dtype) == (tiny_folder.name, 4, 64, "float32")
    assert len(info.revision) == 12
    assert HFVisionLanguageAdapter.from_folder(tiny_folder, device="cpu").info.revision == info.revision


def test_tiny_llava_is_reproducible(tmp_path: Path, tokenizer: PreTrainedTokenizerBase, tiny_folder: Path) -> None:
    again = build_tiny_llava(tmp_path / "again", tokenizer)
    assert (again / "model.safetensors").read_bytes() == (tiny_folder / "model.safetensors").read_bytes()
    assert "<image>" not in tokenizer.get_vocab(), "the caller's tokenizer must not be modified"


def test_states_shape_and_dtype(adapter: HFVisionLanguageAdapter, mixed_requests: list[Request]) -> None:
    states = adapter.last_token_states(mixed_requests, [0, 2])
    assert states.shape == (3, 2, 64)
    assert states.dtype == torch.float32
    assert states.device.type == "cpu"
    assert torch.isfinite(states).all()


def test_layer_order_is_respected(adapter: HFVisionLanguageAdapter, mixed_requests: list[Request]) -> None:
    forward = adapter.last_token_states(mixed_requests, [0, 2])
    backward = adapter.last_token_states(mixed_requests, [2, 0])
    torch.testing.assert_close(backward, forward.flip(1), rtol=0, atol=1e-6)
    assert not torch.allclose(forward[:, 0], forward[:, 1])


def test_batched_early_exit_states_equal_naive_reference(
    adapter: HFVisionLanguageAdapter, mixed_requests: list[Request]
) -> None:
    # The last block is left out: in transformers 5 hidden_states[-1] carries the final norm.
    layers = [0, 1, 2]
    batch = adapter.encode(mixed_requests)
    assert (batch["attention_mask"] == 0).any(), "the batch must actually be padded"
    states = adapter.last_token_states(mixed_requests, layers)
    torch.testing.assert_close(states, naive_states(adapter, mixed_requests, layers), rtol=0, atol=ATOL)


def test_last_token_is_end_of_generation_prompt(adapter: HFVisionLanguageAdapter, images: dict[str, Path]) -> None:
    request = Request("Tell me about this picture.", images["red"])
    prompt = adapter.prompt_text(request)
    assert prompt.startswith("USER: <image>\n")
    assert prompt.endswith("ASSISTANT:")
    assert adapter.prompt_text(Request("No picture.")) == "USER: No picture. ASSISTANT:"
    state = adapter.last_token_states([request], [1])[0, 0]
    # The reference at the final position matches, and the one before it does not, so the
    # comparison really pins the position down.
    batch = adapter.processor(text=[prompt], images=[Image.open(request.image).convert("RGB")], return_tensors="pt")
    with torch.inference_mode():
        hidden = adapter.model(**batch, output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(state, hidden[-1], rtol=0, atol=ATOL)
    assert not torch.allclose(state, hidden[-2], atol=ATOL)


def test_grey_image_is_converted_to_rgb(adapter: HFVisionLanguageAdapter, images: dict[str, Path]) -> None:
    request = Request("What colour?", images["grey"])
    torch.testing.assert_close(
        adapter.last_token_states([request], [2]), naive_states(adapter, [request], [2]), rtol=0, atol=ATOL
    )


def test_padding_does_not_leak(adapter: HFVisionLanguageAdapter, images: dict[str, Path]) -> None:
    target = Request("Is this safe?", images["stripes"])
    short = Request("Hi.")
    long = Request(" ".join(["a very long neighbour that forces lots of padding"] * 8), images["red"])
    with_short = adapter.last_token_states([short, target], [0, 3])[1]
    with_long = adapter.last_token_states([target, long], [0, 3])[0]
    alone = adapter.last_token_states([target], [0, 3])[0]
    torch.testing.assert_close(with_short, with_long, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone, with_long, rtol=0, atol=1e-5)


def test_batches_larger_than_batch_size(tiny_folder: Path, mixed_requests: list[Request]) -> None:
    small_batches = HFVisionLanguageAdapter.from_folder(tiny_folder, device="cpu", batch_size=2)
    states = small_batches.last_token_states(mixed_requests, [1])
    torch.testing.assert_close(states, naive_states(small_batches, mixed_requests, [1]), rtol=0, atol=ATOL)


def test_generate_respects_max_new_tokens(adapter: HFVisionLanguageAdapter, mixed_requests: list[Request]) -> None:
    answers = adapter.generate(mixed_requests, max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
    ids = adapter.generate_token_ids(mixed_requests, max_new_tokens=4)
    assert all(len(row) <= 4 for row in ids)
    assert any(len(row) > 0 for row in ids)
    decoded = [adapter.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    assert answers == decoded


def test_missing_folder_says_how_to_get_a_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="hf download") as caught:
        HFVisionLanguageAdapter.from_folder(missing)
    assert str(missing) in str(caught.value)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        HFVisionLanguageAdapter.from_folder(tmp_path)


def test_unsupported_architecture_lists_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="'bert'.*supported: 'llava'"):
        HFVisionLanguageAdapter.from_folder(tmp_path)


def test_unknown_dtype_is_refused(tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="float64"):
        HFVisionLanguageAdapter.from_folder(tiny_folder, dtype="float64")


def test_unreadable_image_names_its_path(adapter: HFVisionLanguageAdapter, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(ImageError, match="broken.png"):
        adapter.last_token_states([Request("What is this?", broken)], [0])
    with pytest.raises(ImageError, match="absent.png"):
        adapter.generate([Request("What is this?", tmp_path / "absent.png")], max_new_tokens=2)


@pytest.mark.parametrize("layers", [[4], [-1], [0, 7], []])
def test_out_of_range_layers_are_refused(adapter: HFVisionLanguageAdapter, layers: list[int]) -> None:
    with pytest.raises(ValueError):
        adapter.last_token_states([Request("hello")], layers)
