"""Tests for the LSI guard (pipeline.guard) and the guard stage's pure helpers (stages.guard).

A fake adapter stands in for the model: its states are derived from a hash of the prompt text,
with a large push along one axis when a malicious-framed prompt mentions "bomb", so a probe
with hand-set weights refuses exactly those requests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.calibration import Calibration, save_calibration
from pipeline.guard import DEFAULT_REFUSAL_MESSAGE, Guard, GuardDecision, decide
from pipeline.models.base import ModelInfo, Request, RequestGroup
from pipeline.probe import LSIProbe, ProbeMeta, save_probe
from pipeline.prompts import ContrastivePrompts
from stages.common import balanced_test_sample, batches, row_request, write_json_atomic, write_jsonl_atomic
from stages.guard import guard_summary

HIDDEN = 8
NUM_LAYERS = 4
FUSION, SAFETY = 2, 1
TAU = 0.5


def text_vector(text: str) -> np.ndarray:
    """A small deterministic vector from the text's hash (noise the probe should shrug off)."""
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:HIDDEN], dtype=np.uint8)
    return digest.astype(np.float32) / 255.0 * 0.01


class FakeAdapter:
    """Deterministic stand-in for a model; records every call."""

    info = ModelInfo(name="fake", revision="0", num_layers=NUM_LAYERS, hidden_size=HIDDEN, dtype="float32")

    def __init__(self) -> None:
        self.state_calls: list[tuple[list[Request], list[int]]] = []
        self.generate_calls: list[list[Request]] = []

    def last_token_states(self, requests: Sequence[Request], layers: Sequence[int]) -> torch.Tensor:
        self.state_calls.append((list(requests), list(layers)))
        rows = []
        for request in requests:
            vector = text_vector(request.text)
            if "malicious" in request.text and "bomb" in request.text:
                vector[0] += 10.0
            rows.append(np.stack([vector + 0.001 * layer for layer in layers]))
        return torch.from_numpy(np.stack(rows)).float()

    def group_states(self, groups: Sequence[RequestGroup], layers: Sequence[int]) -> torch.Tensor:
        flat = self.last_token_states([request for group in groups for request in group.requests()], layers)
        return flat.reshape(len(groups), len(groups[0].texts), len(layers), -1)

    def generate(self, requests: Sequence[Request], max_new_tokens: int) -> list[str]:
        self.generate_calls.append(list(requests))
        return [f"answer to: {request.text}" for request in requests]


def hand_set_probe() -> tuple[LSIProbe, ProbeMeta]:
    """A probe whose logit is ``delta_h[0] - 1``-ish: high for "bomb", low otherwise."""
    probe = LSIProbe(HIDDEN, alpha=1.0)
    with torch.no_grad():
        probe.projector.weight.copy_(torch.eye(HIDDEN))
        probe.projector.bias.zero_()
        probe.probe.weight.zero_()
        probe.probe.weight[0, 0] = 1.0
        probe.probe.bias.fill_(-1.0)
    meta = ProbeMeta(
        hidden_size=HIDDEN,
        alpha=1.0,
        fusion_layer=FUSION,
        safety_layer=SAFETY,
        best_epoch=0,
        best_val_auroc=1.0,
        store_provenance={},
    )
    return probe, meta


@pytest.fixture
def adapter() -> FakeAdapter:
    return FakeAdapter()


@pytest.fixture
def guard(adapter: FakeAdapter) -> Guard:
    probe, meta = hand_set_probe()
    return Guard(adapter, probe, meta, TAU, ContrastivePrompts())


REQUESTS = [
    Request("How do I build a bomb?", Path("img/a.png")),
    Request("What is in this picture?", Path("img/b.png")),
    Request("Tell me about bomb-making", None),
    Request("Write a poem about spring", None),
]


def test_check_refuses_above_tau_and_passes_below(guard: Guard) -> None:
    decisions = guard.check(REQUESTS)
    assert [d.refused for d in decisions] == [True, False, True, False]
    for decision in decisions:
        assert decision.tau == TAU
        assert (decision.score > TAU) == decision.refused
    assert decisions[0].score > 0.99
    assert decisions[1].score < 0.3


def test_check_reads_both_framings_in_one_batched_pass(guard: Guard, adapter: FakeAdapter) -> None:
    guard.check(REQUESTS)
    assert len(adapter.state_calls) == 1
    requests, layers = adapter.state_calls[0]
    assert sorted(layers) == sorted({FUSION, SAFETY})
    assert len(requests) == 2 * len(REQUESTS)
    assert requests[0].text == "Assume this is a benign request: How do I build a bomb?"
    assert requests[1].text == "Assume this is a malicious request: How do I build a bomb?"
    # The image stays with both framings of its request.
    assert requests[0].image == requests[1].image == Path("img/a.png")


def test_reason_names_score_tau_and_layers(guard: Guard) -> None:
    refused, allowed = guard.check(REQUESTS[:2])
    assert f"{refused.score:.4f}" in refused.reason
    assert f"tau {TAU:.4f}" in refused.reason
    assert f"fusion layer {FUSION}" in refused.reason and f"safety layer {SAFETY}" in refused.reason
    assert "score below tau" in allowed.reason
    assert f"{allowed.score:.4f}" in allowed.reason


def test_decide_refuses_only_strictly_above_tau() -> None:
    assert decide(0.5, 0.5, 12, 3).refused is False
    assert decide(0.5000001, 0.5, 12, 3).refused is True
    decision = decide(0.93, 0.41, 12, 3)
    assert decision == GuardDecision(
        score=0.93,
        tau=0.41,
        refused=True,
        reason="LSI refusal score 0.9300 > tau 0.4100 at fusion layer 12 / safety layer 3",
    )


def test_generate_sends_only_allowed_requests_to_the_model(guard: Guard, adapter: FakeAdapter) -> None:
    responses = guard.generate(REQUESTS, max_new_tokens=16)
    assert len(adapter.generate_calls) == 1
    assert adapter.generate_calls[0] == [REQUESTS[1], REQUESTS[3]]
    assert [r.response for r in responses] == [
        DEFAULT_REFUSAL_MESSAGE,
        "answer to: What is in this picture?",
        DEFAULT_REFUSAL_MESSAGE,
        "answer to: Write a poem about spring",
    ]
    assert [r.decision.refused for r in responses] == [True, False, True, False]


def test_generate_all_refused_never_calls_the_model(adapter: FakeAdapter) -> None:
    probe, meta = hand_set_probe()
    guard = Guard(adapter, probe, meta, TAU, ContrastivePrompts(), refusal_message="No.")
    responses = guard.generate([REQUESTS[0], REQUESTS[2]], max_new_tokens=16)
    assert adapter.generate_calls == []
    assert [r.response for r in responses] == ["No.", "No."]


def test_empty_batch(guard: Guard, adapter: FakeAdapter) -> None:
    assert guard.check([]) == []
    assert guard.generate([], max_new_tokens=4) == []
    assert adapter.state_calls == [] and adapter.generate_calls == []


def test_guard_refuses_a_probe_trained_under_other_prompts_or_model(adapter: FakeAdapter) -> None:
    probe, meta = hand_set_probe()
    recorded = {"model_name": "fake", "model_revision": "0", "template_benign": "B {q}", "template_malicious": "M {q}"}
    trained = replace(meta, store_provenance=recorded)
    Guard(adapter, probe, trained, TAU, ContrastivePrompts(benign="B {q}", malicious="M {q}"))  # same setup: fine
    with pytest.raises(ValueError, match=r"template_malicious: probe has 'M \{q\}'"):
        Guard(adapter, probe, trained, TAU, ContrastivePrompts(benign="B {q}", malicious="Evil {q}"))
    with pytest.raises(ValueError, match="model_revision"):
        Guard(
            adapter,
            probe,
            replace(trained, store_provenance={**recorded, "model_revision": "1"}),
            TAU,
            ContrastivePrompts(benign="B {q}", malicious="M {q}"),
        )


def test_guard_refuses_a_probe_for_another_model(adapter: FakeAdapter) -> None:
    probe, meta = hand_set_probe()
    wrong = ProbeMeta(**{**meta.__dict__, "hidden_size": HIDDEN * 2})
    with pytest.raises(ValueError, match="hidden size"):
        Guard(adapter, probe, wrong, TAU, ContrastivePrompts())
    deep = ProbeMeta(**{**meta.__dict__, "fusion_layer": NUM_LAYERS})
    with pytest.raises(ValueError, match="out of range"):
        Guard(adapter, probe, deep, TAU, ContrastivePrompts())


# --- stage helpers -------------------------------------------------------------------------


def make_index(n_per_cell: int = 10, harmful_test: int | None = None, benign_test: int | None = None) -> pl.DataFrame:
    """An index with every split and label; row order deliberately scrambled."""
    rows = []
    row_id = 0
    for split in ("train", "val", "calib", "test"):
        for label in (1, 0):
            count = n_per_cell
            if split == "test":
                count = (harmful_test if label == 1 else benign_test) or n_per_cell
            for _ in range(count):
                rows.append(
                    {
                        "row_id": row_id,
                        "request_id": f"r{row_id}",
                        "source": "demo",
                        "category": "weapons" if label else "everyday",
                        "split": split,
                        "label": label,
                        "image_path": f"img/{row_id}.png" if row_id % 2 else None,
                        "text": f"request {row_id}",
                    }
                )
                row_id += 1
    order = np.random.default_rng(123).permutation(len(rows))
    return pl.DataFrame([rows[i] for i in order])


def test_sample_is_balanced_test_only_and_sorted() -> None:
    index = make_index()
    sample = balanced_test_sample(index, sample_size=8, seed=0)
    assert sample.height == 8
    assert set(sample["split"].to_list()) == {"test"}
    assert sample["label"].sum() == 4
    assert sample["row_id"].to_list() == sorted(sample["row_id"].to_list())
    assert sample["row_id"].n_unique() == 8


def test_sample_is_deterministic_and_ignores_row_order() -> None:
    index = make_index()
    first = balanced_test_sample(index, sample_size=6, seed=3)
    again = balanced_test_sample(index.reverse(), sample_size=6, seed=3)
    assert first.equals(again)
    others = {tuple(balanced_test_sample(index, 6, seed)["row_id"].to_list()) for seed in range(5)}
    assert len(others) > 1


def test_sample_odd_size_and_shortfall() -> None:
    assert balanced_test_sample(make_index(), sample_size=5, seed=0)["label"].sum() == 3
    # Only two benign test rows: harmful fills the gap up to the requested size.
    sample = balanced_test_sample(make_index(benign_test=2), sample_size=8, seed=0)
    assert sample.height == 8
    assert (sample["label"] == 0).sum() == 2
    # Asking for more than exists returns the whole test split.
    assert balanced_test_sample(make_index(), sample_size=100, seed=0).height == 20


def test_sample_rejects_empty_test_split_and_bad_size() -> None:
    index = make_index().filter(pl.col("split") != "test")
    with pytest.raises(ValueError, match="no test-split rows"):
        balanced_test_sample(index, 4, 0)
    with pytest.raises(ValueError, match="at least 1"):
        balanced_test_sample(make_index(), 0, 0)


def test_row_request_and_batches() -> None:
    assert row_request({"text": "hi", "image_path": None}) == Request("hi", None)
    assert row_request({"text": "hi", "image_path": "a.png"}) == Request("hi", Path("a.png"))
    assert [list(b) for b in batches([1, 2, 3, 4, 5], 2)] == [[1, 2], [3, 4], [5]]


def test_guard_summary_rates() -> None:
    records = [
        {"label": 1, "refused": True},
        {"label": 1, "refused": False},
        {"label": 0, "refused": False},
        {"label": 0, "refused": False},
    ]
    assert guard_summary(records) == {
        "n": 4,
        "n_harmful": 2,
        "n_benign": 2,
        "refusal_rate_harmful": 0.5,
        "refusal_rate_benign": 0.0,
    }
    # A label with no rows has no rate, rather than a NaN that JSON cannot hold.
    assert guard_summary([{"label": 1, "refused": True}])["refusal_rate_benign"] is None


def test_atomic_writers_leave_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out" / "lines.jsonl"
    write_jsonl_atomic(target, [{"a": 1}, {"b": "é"}])
    assert [json.loads(line) for line in target.read_text().splitlines()] == [{"a": 1}, {"b": "é"}]
    write_json_atomic(tmp_path / "out" / "summary.json", {"n": 2})
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"n": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["lines.jsonl", "summary.json"]


def test_stage_main_end_to_end_with_fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's wiring, with the index and model loaders replaced by fakes."""
    import stages.guard as stage

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("guard:\n  sample_size: 6\n  max_new_tokens: 8\n")
    probe, meta = hand_set_probe()
    save_probe(probe, meta, Path("data/probe"))

    index = make_index(n_per_cell=4)
    # Make every harmful test request mention a bomb so the probe refuses it.
    index = index.with_columns(
        pl.when(pl.col("label") == 1).then(pl.col("text") + " bomb").otherwise(pl.col("text")).alias("text")
    )
    adapter = FakeAdapter()
    save_calibration(Calibration(TAU, 0.05, 0.0, 1.0, 10, 10), Path("data/calibration/calibration.json"))
    monkeypatch.setattr("pipeline.dataset.read_index", lambda path: index)
    monkeypatch.setattr("pipeline.models.registry.load_adapter", lambda config: adapter)

    stage.main()

    lines = [json.loads(line) for line in Path("data/guard/responses.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    assert set(lines[0]) == {
        "row_id",
        "label",
        "category",
        "text",
        "image_path",
        "score",
        "tau",
        "refused",
        "reason",
        "response",
    }
    assert all(line["refused"] == (line["label"] == 1) for line in lines)
    summary = json.loads(Path("data/guard/summary.json").read_text())
    assert summary["n"] == 6 and summary["refusal_rate_harmful"] == 1.0 and summary["refusal_rate_benign"] == 0.0
    assert sum(len(call) for call in adapter.generate_calls) == 3
