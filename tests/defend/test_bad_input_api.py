"""The Python API surface of the bad-input matrix: every ``Guard`` method raises a clear error for a bad
request, whatever ``on_error`` says, before the model is asked, and earlier results stay byte-identical."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import GuardConfig
from pipeline.data.limits import RequestTooLarge
from pipeline.defend.deadline import RequestTimedOut
from pipeline.defend.decisions import response_record
from pipeline.defend.guard import Guard
from pipeline.images import ImageTooLarge
from pipeline.io import write_jsonl_atomic
from pipeline.models.base import Request
from tests.clocks import ExpiredClock
from tests.defend.test_guard import FakeAdapter, hand_set_guard
from tests.snapshots import file_digest

MEGABYTE_TEXT = "x" * 1_000_000


def timed_out(guard: Guard, huge: Path) -> object:
    with guard.time_limit(clock=ExpiredClock()):
        return guard.generate(None, "Write a poem")


@dataclass(frozen=True)
class Case:
    """One bad call: what it does to a guard (given the huge PNG), the error it must raise and its text."""

    id: str
    call: Callable[[Guard, Path], object]
    error: type[Exception]
    message: str
    policy: str = "lsi"


CASES = [
    Case("check-megabyte-text", lambda g, h: g.check(None, MEGABYTE_TEXT), RequestTooLarge, "1,000,000 characters"),
    Case(
        "generate-megabyte-text",
        lambda g, h: g.generate(None, MEGABYTE_TEXT),
        RequestTooLarge,
        "over the limit of 32,768 (limits.max_request_chars)",
    ),
    Case(
        "ecso-policy-megabyte-text",
        lambda g, h: g.generate(None, MEGABYTE_TEXT),
        RequestTooLarge,
        "limits.max_request_chars",
        policy="ecso",
    ),
    Case(
        "check-many-names-the-request",
        lambda g, h: g.check_many([Request("fine"), Request("also fine"), Request(MEGABYTE_TEXT)]),
        RequestTooLarge,
        "request 3 of 3: request text is 1,000,000 characters",
    ),
    Case("check-huge-image", lambda g, h: g.check(h, "What is this?"), ImageTooLarge, "huge.png: 20000x20000"),
    Case(
        "generate-many-huge-image",
        lambda g, h: g.generate_many([Request("What is this?", h)]),
        ImageTooLarge,
        "request 1 of 1: {huge}: 20000x20000 = 400,000,000 pixels, over the limit of 40,000,000 "
        "(limits.max_image_pixels)",
    ),
    Case("explain-megabyte-text", lambda g, h: g.explain(None, MEGABYTE_TEXT), RequestTooLarge, "1,000,000 characters"),
    Case("generate-empty-text", lambda g, h: g.generate(None, "  "), ValueError, "the request text is empty"),
    Case(
        "generate-past-its-deadline",
        timed_out,
        RequestTimedOut,
        "took longer than limits.request_timeout_s = 120 s",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_api_input_raises_before_the_model_and_leaves_earlier_results(
    case: Case, tmp_path: Path, huge_png: Path
) -> None:
    adapter = FakeAdapter()
    # on_error "answer": a bad request must still raise, never be answered unchecked.
    guard = hand_set_guard(adapter, config=GuardConfig(on_error="answer", policy=case.policy))
    results = tmp_path / "results.jsonl"
    write_jsonl_atomic(results, [response_record(guard.generate(None, "Write a poem about spring"))])
    before, calls = file_digest(results), (len(adapter.state_calls), len(adapter.generate_calls))
    with pytest.raises(case.error) as info:
        case.call(guard, huge_png)
    assert case.message.replace("{huge}", str(huge_png)) in str(info.value)
    assert (len(adapter.state_calls), len(adapter.generate_calls)) == calls  # no model work
    assert file_digest(results) == before
