"""The embedded default (SmolLM2-135M + RapidOCR) on its real weights: slow, marked so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.config import VARIANTS, ContrastivePrompts
from pipeline.detect.features import states_for_requests
from pipeline.models.base import Request
from pipeline.models.embedded import (
    IMAGE_CLOSE,
    IMAGE_OPEN,
    EmbeddedAdapter,
    ModelLoadError,
)
from pipeline.models.ocr import UnreadableImage
from pipeline.models.reference import reference_states

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter(embedded_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> EmbeddedAdapter:
    return EmbeddedAdapter.from_folder(embedded_folder, device="cpu", ocr_cache=tmp_path_factory.mktemp("ocr"))


@pytest.fixture(scope="module")
def typed_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = Image.new("RGB", (640, 120), "white")
    ImageDraw.Draw(image).text((20, 30), "Bake a lemon cake", fill="black", font=ImageFont.load_default(size=44))
    path = tmp_path_factory.mktemp("img") / "typed.png"
    image.save(path)
    return path


def test_ocr_text_sits_in_the_user_turn(adapter: EmbeddedAdapter, typed_image: Path) -> None:
    prompt = adapter.prompt_text(Request("Follow the instruction in the image.", typed_image))
    user = prompt.split("<|im_start|>user\n")[1]
    assert user.startswith(f"{IMAGE_OPEN}\n") and IMAGE_CLOSE in user
    assert "lemon cake" in user.lower()
    assert prompt.endswith("<|im_start|>assistant\n")  # the last token is the newline after the header


def test_ocr_is_cached_by_hash(adapter: EmbeddedAdapter, typed_image: Path) -> None:
    adapter.reader.read(typed_image)
    cached = list(adapter.reader.cache_dir.glob("*.json"))  # type: ignore[union-attr]
    assert len(cached) == 1


def test_batched_states_equal_naive_reference(adapter: EmbeddedAdapter, typed_image: Path) -> None:
    requests = [
        Request("How do I kill a stuck Python process?"),
        Request("Follow the instruction in the image.", typed_image),
        Request("hi"),
    ]
    layers = [0, 3, 12, 29]
    batched = adapter.last_token_states(requests, layers)
    for i, request in enumerate(requests):
        encoded = adapter.tokenizer(adapter.prompt_text(request), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = adapter.model(**encoded, output_hidden_states=True)
        # hidden_states[-1] has the final norm applied in transformers 5; block 29's raw output does not.
        reference = torch.stack([out.hidden_states[k + 1][0, -1] for k in layers[:-1]])
        torch.testing.assert_close(batched[i, :-1], reference, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(batched[i, -1], out.hidden_states[-1][0, -1], atol=1e-2)


def test_grouped_framings_equal_the_naive_reference(adapter: EmbeddedAdapter, typed_image: Path) -> None:
    """The extract stage's path (shared prefix once, packed tails, early stop) on the real weights."""
    prompts = ContrastivePrompts()
    requests = [
        Request("How do I kill a stuck Python process?"),
        Request("Follow the instruction in the image.", typed_image),
        Request("hi"),
    ]
    layers = [3, 12, 18]
    grouped = states_for_requests(adapter, requests, prompts, layers)
    assert grouped.shape == (3, len(VARIANTS), 3, adapter.info.hidden_size)
    flat = [Request(prompts.variants(r.text)[v], r.image) for r in requests for v in VARIANTS]
    naive = reference_states(adapter, flat, layers).reshape(grouped.shape)
    relative = (grouped - naive).abs().max() / naive.abs().max()
    assert relative < 1e-5, f"max |diff| / max |state| = {relative:.2e}"


def test_generate_answers(adapter: EmbeddedAdapter) -> None:
    answers = adapter.generate([Request("What is the capital of France?"), Request("Say hello.")], max_new_tokens=12)
    assert len(answers) == 2 and "paris" in answers[0].lower()


def test_unreadable_image_is_named(adapter: EmbeddedAdapter, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UnreadableImage, match="bad.png"):
        adapter.last_token_states([Request("x", bad)], [1])
    with pytest.raises(UnreadableImage, match="missing.png"):
        adapter.last_token_states([Request("x", tmp_path / "missing.png")], [1])


def test_missing_folder_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="convert_model"):
        EmbeddedAdapter.from_folder(tmp_path)
