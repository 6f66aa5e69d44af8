"""Tests for ECSO (pipeline.defend.ecso), its stage's records (pipeline.defend.records) and the stage.

The fake adapter scripts its replies from the prompt: a request's own text carries the harm
check reply it should get, as ``[judge:...]``, so each test chooses exactly which requests the
model will call harmful.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.config import GREEDY, Decoding, ECSOConfig
from pipeline.defend.ecso import (
    ECSO,
    NO_IMAGE_CAPTION,
    ECSORecord,
    check_prompts,
    fill,
    is_yes,
)
from pipeline.defend.records import ecso_record, ecso_summary
from pipeline.models.base import ModelInfo, Request, RequestGroup

CONFIG = ECSOConfig(
    max_new_tokens=8,
    judge_max_new_tokens=3,
    caption_max_new_tokens=5,
    harm_check_prompt="JUDGE q={q} answer={answer}",
    caption_prompt="CAPTION q={q}",
    answer_from_caption_prompt="SAFE caption={caption} q={q}",
)

_JUDGE = re.compile(r"\[judge:(.*?)\]")


class FakeAdapter:
    """Scripted replies by prompt kind; records every generate call."""

    info = ModelInfo(name="fake", revision="0", num_layers=2, hidden_size=4, dtype="float32")

    def __init__(self) -> None:
        self.generate_calls: list[list[Request]] = []
        self.token_budgets: list[int] = []
        self.decodings: list[Decoding] = []

    def last_token_states(self, requests: Sequence[Request], layers: Sequence[int]) -> torch.Tensor:
        return torch.zeros(len(requests), len(layers), self.info.hidden_size)

    def group_states(self, groups: Sequence[RequestGroup], layers: Sequence[int]) -> torch.Tensor:
        flat = self.last_token_states([request for group in groups for request in group.requests()], layers)
        return flat.reshape(len(groups), len(groups[0].texts), len(layers), -1)

    def generate(self, requests: Sequence[Request], max_new_tokens: int, decoding: Decoding = GREEDY) -> list[str]:
        self.generate_calls.append(list(requests))
        self.token_budgets.append(max_new_tokens)
        self.decodings.append(decoding)
        return [self._reply(request.text) for request in requests]

    @staticmethod
    def _reply(text: str) -> str:
        if text.startswith("JUDGE"):
            match = _JUDGE.search(text)
            return match.group(1) if match else "no"
        if text.startswith("CAPTION"):
            return f"a photo for <{text}>"
        if text.startswith("SAFE"):
            return f"safe answer for <{text}>"
        return f"first answer to <{text}>"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("yes", True),
        ("Yes.", True),
        ("YES, it is harmful.", True),
        ("  yes!\nbecause", True),
        ("**Yes**", True),
        ("no", False),
        ("No.", False),
        ("yesterday", False),
        ("Yesterday it was fine", False),
        ("No, yes", False),
        ("", False),
        ("   ", False),
    ],
)
def test_only_a_first_word_of_yes_counts_as_harmful(raw: str, expected: bool) -> None:
    assert is_yes(raw) is expected


def test_fill_substitutes_in_one_pass() -> None:
    # Placeholders inside the model's answer must stay literal, not be filled in turn.
    assert fill("q={q} a={answer}", q="Q", answer="see {q} and {caption}") == "q=Q a=see {q} and {caption}"
    assert fill("{caption} {other}", caption="C") == "C {other}"


def test_prompts_missing_a_placeholder_are_refused() -> None:
    check_prompts(ECSOConfig())
    with pytest.raises(ValueError, match="harm_check_prompt"):
        ECSO(FakeAdapter(), ECSOConfig(harm_check_prompt="Is it harmful?"))
    with pytest.raises(ValueError, match="answer_from_caption_prompt"):
        ECSO(FakeAdapter(), ECSOConfig(answer_from_caption_prompt="Answer {q} safely."))


REQUESTS = [
    Request("bomb with image [judge:Yes.]", Path("img/bomb.png")),
    Request("bomb text only [judge:yes]", None),
    Request("cat with image [judge:no]", Path("img/cat.png")),
    Request("weather text only [judge:yesterday]", None),
]


@pytest.fixture
def run() -> tuple[FakeAdapter, list[ECSORecord]]:
    adapter = FakeAdapter()
    return adapter, ECSO(adapter, CONFIG).run(REQUESTS)


def test_each_step_is_one_batched_call_over_the_requests_that_need_it(
    run: tuple[FakeAdapter, list[ECSORecord]],
) -> None:
    adapter, _ = run
    assert [len(call) for call in adapter.generate_calls] == [4, 4, 1, 2]
    # Only the verdict's first word counts, so the self-check gets its own short budget; the caption its own.
    assert adapter.token_budgets == [8, 3, 5, 8]
    answer, judge, caption, safe = adapter.generate_calls
    assert answer == REQUESTS
    # The harm check sees the image and shows the first answer.
    assert [r.image for r in judge] == [r.image for r in REQUESTS]
    assert judge[0].text == f"JUDGE q={REQUESTS[0].text} answer=first answer to <{REQUESTS[0].text}>"
    # Only the harmful request with an image is captioned, with the image.
    assert caption == [Request(f"CAPTION q={REQUESTS[0].text}", Path("img/bomb.png"))]
    # Eyes closed: the second answer never carries an image.
    assert all(r.image is None for r in safe)


def test_records_keep_every_step(run: tuple[FakeAdapter, list[ECSORecord]]) -> None:
    _, records = run
    assert [r.judged_harmful for r in records] == [True, True, False, False]
    assert [r.harm_check_raw for r in records] == ["Yes.", "yes", "no", "yesterday"]
    for request, record in zip(REQUESTS, records, strict=True):
        assert record.answer == f"first answer to <{request.text}>"

    with_image, text_only, safe_image, safe_text = records
    assert with_image.caption == f"a photo for <CAPTION q={REQUESTS[0].text}>"
    assert with_image.final_answer == f"safe answer for <SAFE caption={with_image.caption} q={REQUESTS[0].text}>"
    assert with_image.changed is True
    # A text-only request has nothing to caption: the safe prompt says so.
    assert text_only.caption is None
    assert text_only.final_answer == f"safe answer for <SAFE caption={NO_IMAGE_CAPTION} q={REQUESTS[1].text}>"
    assert text_only.changed is True
    for record in (safe_image, safe_text):
        assert record.caption is None
        assert record.final_answer == record.answer
        assert record.changed is False


def test_decoding_applies_to_the_writing_steps_and_the_self_check_stays_greedy() -> None:
    adapter = FakeAdapter()
    sampled = Decoding(do_sample=True, temperature=0.7, top_p=0.9, seed=5)
    ECSO(adapter, replace(CONFIG, decoding=sampled)).run(REQUESTS)
    assert adapter.decodings == [sampled, GREEDY, sampled, sampled]


def test_each_record_times_the_steps_it_went_through() -> None:
    ticks = iter(range(100))
    records = ECSO(FakeAdapter(), CONFIG, clock=lambda: float(next(ticks))).run(REQUESTS)
    # Each batched step takes one tick on this clock, shared evenly by the requests in it.
    assert records[0].seconds == {"answer": 0.25, "harm_check": 0.25, "caption": 1.0, "answer_from_caption": 0.5}
    assert records[1].seconds == {"answer": 0.25, "harm_check": 0.25, "answer_from_caption": 0.5}
    assert records[2].seconds == {"answer": 0.25, "harm_check": 0.25}
    given = ECSO(FakeAdapter(), CONFIG, clock=lambda: float(next(ticks))).run(REQUESTS[2:], answers=["a", "b"])
    assert all("answer" not in record.seconds for record in given)


def test_nothing_judged_harmful_stops_after_two_steps() -> None:
    adapter = FakeAdapter()
    records = ECSO(adapter, CONFIG).run([REQUESTS[2], REQUESTS[3]])
    assert len(adapter.generate_calls) == 2
    assert not any(r.changed or r.judged_harmful for r in records)


def test_harmful_text_only_batch_skips_the_caption_step() -> None:
    adapter = FakeAdapter()
    ECSO(adapter, CONFIG).run([REQUESTS[1]])
    assert [call[0].text.split()[0] for call in adapter.generate_calls] == ["bomb", "JUDGE", "SAFE"]


def test_empty_batch_calls_nothing() -> None:
    adapter = FakeAdapter()
    assert ECSO(adapter, CONFIG).run([]) == []
    assert adapter.generate_calls == []


def test_default_prompts_fill_cleanly() -> None:
    adapter = FakeAdapter()
    ECSO(adapter, ECSOConfig(max_new_tokens=4)).run([Request("q [judge:no]", None)])
    judge = adapter.generate_calls[1][0].text
    assert "{" not in judge and "first answer to <q [judge:no]>" in judge


# --- stage helpers -------------------------------------------------------------------------


def test_stage_record_and_summary(run: tuple[FakeAdapter, list[ECSORecord]]) -> None:
    _, records = run
    rows = [
        {"row_id": i, "label": label, "category": "c", "text": r.text, "image_path": str(r.image) if r.image else None}
        for i, (label, r) in enumerate(zip([1, 1, 0, 0], REQUESTS, strict=True))
    ]
    lines = [ecso_record(row, record) for row, record in zip(rows, records, strict=True)]
    assert set(lines[0]) == {
        "row_id",
        "label",
        "category",
        "text",
        "image_path",
        "answer",
        "harm_check_raw",
        "judged_harmful",
        "caption",
        "final_answer",
        "changed",
        "seconds",
    }
    json.dumps(lines)  # every line must be JSON-serialisable
    assert ecso_summary(lines) == {
        "n": 4,
        "n_harmful": 2,
        "n_benign": 2,
        "judged_harmful_rate_harmful": 1.0,
        "judged_harmful_rate_benign": 0.0,
        "changed_rate": 0.5,
    }
    assert ecso_summary([])["changed_rate"] is None


def test_stage_main_end_to_end_with_fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's wiring, with the index and model loaders replaced by fakes."""
    import stages.ecso as stage

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("ecso:\n  sample_size: 4\n  max_new_tokens: 8\n")
    rows = []
    for row_id in range(16):
        label = row_id % 2
        rows.append(
            {
                "row_id": row_id,
                "request_id": f"r{row_id}",
                "source": "demo",
                "category": "c",
                "split": "test" if row_id < 12 else "train",
                "label": label,
                "image_path": None,
                "text": f"request {row_id}",
            }
        )
    index = pl.DataFrame([rows[i] for i in np.random.default_rng(1).permutation(len(rows))])
    adapter = FakeAdapter()
    monkeypatch.setattr(stage, "read_index", lambda path: index)
    monkeypatch.setattr(stage, "load_adapter", lambda config, *_: adapter)

    stage.main()

    lines = [json.loads(line) for line in Path("data/ecso/records.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and sum(line["label"] for line in lines) == 2
    assert all(line["row_id"] < 12 for line in lines)
    summary = json.loads(Path("data/ecso/summary.json").read_text())
    assert summary["n"] == 4 and summary["changed_rate"] == 0.0
