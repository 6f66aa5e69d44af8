"""The fast extraction paths against the naive reference, for every supported family's tiny model.

The equivalence tests are the contract of :mod:`pipeline.models.forward`: batched, left-padded,
prefix-sharing, early-stopping forwards give the states that one prompt at a time, full depth,
``output_hidden_states=True`` gives, within ``ATOL`` (float32).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.models.base import Request, RequestGroup
from pipeline.models.hf_vlm import SUPPORTED, HFVisionLanguageAdapter
from pipeline.models.prefix_cache import set_prefix_reuse
from pipeline.models.prefix_forward import length_buckets, shared_prefix_length
from pipeline.models.reference import reference_states
from pipeline.testing.tiny_models import TINY_FAMILIES

ATOL = 1e-4
FRAMINGS = ("Assume this is a benign request: {q}", "Assume this is a malicious request: {q}", "{q}")


@pytest.fixture(scope="module")
def adapter(tiny_llava_folder: Path) -> HFVisionLanguageAdapter:
    return HFVisionLanguageAdapter.from_folder(tiny_llava_folder, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> list[RequestGroup]:
    folder = tmp_path_factory.mktemp("images")
    red, blue = folder / "red.png", folder / "blue.png"
    Image.new("RGB", (50, 40), (220, 30, 30)).save(red)
    Image.new("RGB", (64, 30), (20, 40, 200)).save(blue)
    questions = [
        ("What is shown here?", red),
        ("Write a long and detailed story about a lighthouse keeper who finds a bottle.", None),
        ("Describe it.", blue),
        ("hi", None),
    ]
    return [RequestGroup(tuple(f.replace("{q}", q) for f in FRAMINGS), image) for q, image in questions]


def flat(groups: list[RequestGroup]) -> list[Request]:
    return [request for group in groups for request in group.requests()]


def test_shared_prefix_leaves_a_token_for_the_tail() -> None:
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7], [7, 8]]) == 0
    assert shared_prefix_length([[1, 2], [3, 4]]) == 0


def test_length_buckets_cover_every_row_once_and_bound_padding() -> None:
    lengths = [13, 60, 14, 30, 31, 100, 12, 59]
    buckets = length_buckets(lengths, slack=1.25, extra=0)
    assert sorted(i for bucket in buckets for i in bucket) == list(range(len(lengths)))
    for bucket in buckets:
        sizes = [lengths[i] for i in bucket]
        assert max(sizes) <= 1.25 * min(sizes)


def test_every_supported_family_has_a_tiny_model() -> None:
    assert set(TINY_FAMILIES) == set(SUPPORTED)


def test_grouped_states_equal_the_naive_reference(
    family_adapter: HFVisionLanguageAdapter, groups: list[RequestGroup]
) -> None:
    layers = [0, 2]
    grouped = family_adapter.group_states(groups, layers)
    assert grouped.shape == (4, 3, 2, family_adapter.info.hidden_size)
    naive = reference_states(family_adapter, flat(groups), layers, prompts_per_forward=1).reshape(grouped.shape)
    torch.testing.assert_close(grouped, naive, rtol=0, atol=ATOL)


def test_single_pass_states_equal_the_naive_reference(
    family_adapter: HFVisionLanguageAdapter, groups: list[RequestGroup]
) -> None:
    requests = flat(groups)
    batch = family_adapter.encode(requests)
    assert (batch["attention_mask"] == 0).any(), "the batch must actually be padded"
    single = family_adapter.last_token_states(requests, [1, 2])
    torch.testing.assert_close(single, reference_states(family_adapter, requests, [1, 2]), rtol=0, atol=ATOL)


def test_grouped_states_do_not_depend_on_the_batch(
    family_adapter: HFVisionLanguageAdapter, groups: list[RequestGroup]
) -> None:
    together = family_adapter.group_states(groups, [1])
    for i, group in enumerate(groups):
        torch.testing.assert_close(family_adapter.group_states([group], [1])[0], together[i], rtol=0, atol=1e-5)


def test_prefix_runs_the_image_once_and_stops_inside_the_deepest_block(
    adapter: HFVisionLanguageAdapter, groups: list[RequestGroup]
) -> None:
    """The vision tower sees each image once; block 2 is entered twice (prefix, tails) but finishes only once."""
    # Without cross-request reuse, so each batch runs its whole prefix (reuse: tests/models/test_prefix_cache.py).
    set_prefix_reuse(adapter, False)
    entered = [0] * adapter.info.num_layers
    finished = [0] * adapter.info.num_layers
    images_seen: list[int] = []
    handles = []
    for k, block in enumerate(adapter.blocks):
        handles.append(block.register_forward_pre_hook(lambda *_, k=k: entered.__setitem__(k, entered[k] + 1)))
        handles.append(block.register_forward_hook(lambda *_, k=k: finished.__setitem__(k, finished[k] + 1)))
    vision = adapter.model.model.vision_tower

    def count_images(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        images_seen.append(int(pixels.shape[0]))

    handles.append(vision.register_forward_pre_hook(count_images, with_kwargs=True))
    batch_rows: list[int] = []
    handles.append(
        adapter.blocks[0].register_forward_pre_hook(lambda _m, args: batch_rows.append(int(args[0].shape[0])))
    )
    try:
        adapter.group_states(groups, [0, 2])
    finally:
        for handle in handles:
            handle.remove()
        set_prefix_reuse(adapter, True)
    assert images_seen == [2]  # two groups carry an image; three framings each, encoded once
    # Image and text-only requests run as separate batches (prefix, then packed tails), two groups
    # each: the tails ride one row per request, never one row per framing.
    assert batch_rows == [2, 2, 2, 2]
    assert entered[3] == 0 and finished[3] == 0  # nothing past the deepest stored block
    assert finished[2] < entered[2]  # the prefix forward was cut inside block 2, after its keys and values


def test_image_tokens_outside_the_shared_prefix_fall_back_to_single_pass(
    adapter: HFVisionLanguageAdapter, groups: list[RequestGroup], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend "malicious" is an image token: the tails then hold one, and the safe path must be taken.
    malicious_ids = frozenset(adapter.tokenizer(" malicious", add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(adapter, "image_token_ids", adapter.image_token_ids | malicious_ids)
    calls: list[int] = []
    original = adapter.model.forward
    monkeypatch.setattr(adapter.model, "forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    grouped = adapter.group_states(groups[:1], [1])
    assert len(calls) == 1  # one plain forward over all three prompts, no prefix pass
    naive = reference_states(adapter, flat(groups[:1]), [1]).reshape(grouped.shape)
    torch.testing.assert_close(grouped, naive, rtol=0, atol=ATOL)


def test_reference_refuses_the_last_block(adapter: HFVisionLanguageAdapter) -> None:
    with pytest.raises(ValueError, match="final norm"):
        reference_states(adapter, [Request("hello")], [adapter.info.num_layers - 1])
