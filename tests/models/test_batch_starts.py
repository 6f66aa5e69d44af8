"""Starts shared within a batch (pipeline.models.batch_starts): a long request's views run their common start once.

The clusters are a pure function of the batch's token rows; the states with in-batch sharing equal
those without any reuse, on every tiny family and the embedded model, under both prompt positions
and both reads, in batches that mix a long request's views with short requests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from pipeline.config import ContrastivePrompts
from pipeline.defend.views import request_views
from pipeline.models.base import RequestGroup
from pipeline.models.batch_starts import Cluster, shared_clusters
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.hf_vlm import HFVisionLanguageAdapter
from pipeline.models.prefix_cache import set_prefix_reuse
from pipeline.testing.tiny_embedded import tiny_embedded, tiny_llama

LAYERS = [0, 1]
ATOL = 1e-4
WORDS = 24
LONG = (
    "Please read the whole of this note before you answer. I volunteer at the town library on Saturdays, "
    "and the manager asked me to write a short guide for new volunteers: how to shelve returned books, how to "
    "help visitors find a title in the catalogue, and what to do when the printer jams again."
)


def view_groups(position: str, picture: Path | None = None) -> list[RequestGroup]:
    """A long request's views (whole, first and last words), a short request and another long one."""
    prompts = ContrastivePrompts(position=position)
    texts = request_views(LONG, "ends", (), WORDS) + ["How do I kill a Python process?", LONG[::-1]]
    assert len(texts) == 5
    names = ("benign", "malicious", "plain")
    out = []
    for text in texts:
        variants = prompts.variants(text)
        spans = tuple(prompts.request_span(name, text) for name in names)
        out.append(RequestGroup(tuple(variants[name] for name in names), picture, spans=spans))
    return out


def shared_both_ways(
    adapter: object, groups: list[RequestGroup], reads: tuple[str, ...], min_batch_saving: int = 0
) -> int:
    """States with reuse (in-batch starts included) equal those without; the prompt tokens shared within the batch.

    ``min_batch_saving`` 0 by default: these batches are small, and the path under test is the sharing itself.
    """
    set_prefix_reuse(adapter, False)
    expected = adapter.group_states(groups, LAYERS, reads)  # type: ignore[attr-defined]
    cache = set_prefix_reuse(adapter, True, min_batch_saving=min_batch_saving)
    assert cache is not None
    found = adapter.group_states(groups, LAYERS, reads)  # type: ignore[attr-defined]
    torch.testing.assert_close(found, expected, atol=ATOL, rtol=ATOL)
    return cache.stats().shared_in_batch


def test_rows_cluster_by_what_they_share_after_the_common_start() -> None:
    head = [1, 2, 3]
    rows = [
        head + list(range(10, 40)),  # 0: shares 20 with row 2
        head + [7, 7, 7],  # 1: alone
        head + list(range(10, 30)) + [99],  # 2
        head + list(range(10, 20)),  # 3: shares only 10 with 0 and 2
        head + [5] * 18,  # 4: shares 18 with 5
        head + [5] * 25,  # 5
    ]
    assert shared_clusters(rows, skip=3, min_tokens=16) == [Cluster((0, 2), 23), Cluster((4, 5), 21)]
    assert shared_clusters(rows, skip=3, min_tokens=21) == []
    # The same rows in another order make the same clusters (by content): the batch alone decides.
    order = [5, 3, 1, 0, 4, 2]
    again = shared_clusters([rows[i] for i in order], skip=3, min_tokens=16)
    assert sorted((tuple(sorted(order[i] for i in c.rows)), c.length) for c in again) == [((0, 2), 23), ((4, 5), 21)]


def test_a_run_of_rows_shares_what_all_of_them_share() -> None:
    rows = [[0] * 20 + [1] * 10, [0] * 20 + [1] * 5 + [2], [0] * 18 + [3]]
    assert shared_clusters(rows, skip=0, min_tokens=16) == [Cluster((0, 1, 2), 18)]
    assert shared_clusters([[4] * 30], skip=0) == []
    assert shared_clusters([], skip=0) == []


@pytest.mark.parametrize("reads", [("last",), ("last", "mean")])
@pytest.mark.parametrize("position", ["before", "after"])
def test_every_family_views_equal_without_reuse(
    family_adapter: HFVisionLanguageAdapter, position: str, reads: tuple[str, ...]
) -> None:
    shared = shared_both_ways(family_adapter, view_groups(position), reads)
    if position == "after":  # the request itself is in every framing's shared prefix
        assert shared > 0, "the long request's views never shared their start"


@pytest.fixture(scope="module")
def embedded(gguf_tokenizer: PreTrainedTokenizerBase) -> EmbeddedAdapter:
    return tiny_embedded(tiny_llama(gguf_tokenizer, seed=2), gguf_tokenizer, ())


@pytest.mark.parametrize("reads", [("last",), ("last", "mean")])
@pytest.mark.parametrize("position", ["before", "after"])
def test_embedded_views_equal_without_reuse(embedded: EmbeddedAdapter, position: str, reads: tuple[str, ...]) -> None:
    shared = shared_both_ways(embedded, view_groups(position), reads)
    if position == "after":
        assert shared > 0, "the long request's views never shared their start"


def test_batches_with_images_share_no_start_within_the_batch(
    family_adapter: HFVisionLanguageAdapter, picture: Path
) -> None:
    assert shared_both_ways(family_adapter, view_groups("after", picture), ("last", "mean")) == 0


def test_shared_starts_depend_on_the_batch_alone(embedded: EmbeddedAdapter) -> None:
    """Bit for bit the same states whatever ran before, and whatever order the batch's rows come in."""
    groups = view_groups("after")
    set_prefix_reuse(embedded, True, min_batch_saving=0)
    fresh = embedded.group_states(groups, LAYERS, ("last", "mean"))
    embedded.group_states(groups[1:3], LAYERS, ("last", "mean"))
    assert torch.equal(embedded.group_states(groups, LAYERS, ("last", "mean")), fresh)


def test_a_batch_saving_less_than_the_floor_shares_nothing(embedded: EmbeddedAdapter) -> None:
    """Below ``min_batch_saving`` a batch runs with the cached start alone: more calls would cost more than saved."""
    groups = view_groups("after")
    saved = shared_both_ways(embedded, groups, ("last",))
    assert saved > 0
    assert shared_both_ways(embedded, groups, ("last",), min_batch_saving=saved + 1) == 0
    assert shared_both_ways(embedded, groups, ("last",), min_batch_saving=saved) == saved
    with pytest.raises(ValueError, match="min_batch_saving"):
        set_prefix_reuse(embedded, True, min_batch_saving=-1)


@pytest.mark.slow
def test_default_model_views_equal_without_reuse(embedded_folder: Path) -> None:
    adapter = EmbeddedAdapter.from_folder(embedded_folder, device="cpu")
    for position in ("before", "after"):
        shared = shared_both_ways(adapter, view_groups(position), ("last", "mean"))
        assert position == "before" or shared > 0
