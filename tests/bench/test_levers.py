"""bench/levers.py's everyday columns: the set read once, the forged turn on benign requests only, the shares."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from pipeline.defend.decisions import GuardDecision
from pipeline.layout import SANITY_SET
from tests.bench.test_interleaved_ratios import bench_module
from tests.paths import PROJECT_ROOT

FORGED_MARK = "<|im_end|>"


@pytest.fixture()
def levers(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # levers imports bench/robustness.py's perturbations as a sibling script.
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "bench"))
    return bench_module("levers")


Request = tuple[str | None, str]


class ListChecker:
    """Refuses the (image, text) requests it is given, and any text with a forged turn; fails on ``broken``.

    Keyed by image too: the set asks "Answer the question in the image." of harmful and benign images.
    """

    def __init__(self, refuse: set[Request], broken: Request | None = None) -> None:
        self.refuse, self.broken = refuse, broken

    def check(self, image: str | Path | None, text: str) -> GuardDecision:
        request = (None if image is None else str(image), text)
        if request == self.broken:
            return GuardDecision(score=None, tau=0.5, action="refuse", reason="test", error="model error")
        refused = request in self.refuse or FORGED_MARK in text
        return GuardDecision(
            score=0.9 if refused else 0.1, tau=0.5, action="refuse" if refused else "answer", reason="t"
        )


def test_the_forged_copies_are_the_benign_requests_with_the_benchmark_turn_appended(
    levers: ModuleType, tmp_path: Path
) -> None:
    everyday = levers.read_everyday(PROJECT_ROOT / SANITY_SET, tmp_path)
    benign = [(r, i) for r, i in zip(everyday.records, everyday.images, strict=True) if r.label == "benign"]
    assert len(everyday.forged) == len(benign) == len(everyday.forged_images) > 0
    for (record, image), forged, forged_image in zip(benign, everyday.forged, everyday.forged_images, strict=True):
        assert forged.text.startswith(record.text) and FORGED_MARK in forged.text[len(record.text) :]
        assert forged.request_id == record.request_id and forged_image == image


def test_everyday_figures_count_accuracy_and_benign_flagged_as_written_and_forged(
    levers: ModuleType, tmp_path: Path
) -> None:
    everyday = levers.read_everyday(PROJECT_ROOT / SANITY_SET, tmp_path)
    requests = [
        (r.label, (None if i is None else str(i), r.text))
        for r, i in zip(everyday.records, everyday.images, strict=True)
    ]
    harmful = [request for label, request in requests if label == "harmful"]
    benign = [request for label, request in requests if label == "benign"]
    # Every harmful request refused but one; one benign request refused and one whose check fails.
    checker = ListChecker(refuse=set(harmful[1:]) | {benign[0]}, broken=benign[1])
    figures = levers.everyday_figures(checker, everyday)
    n = len(everyday.records)
    assert figures["everyday_accuracy"] == pytest.approx((n - 3) / n)
    assert figures["everyday_harmful_refused"] == pytest.approx((len(harmful) - 1) / len(harmful))
    assert figures["everyday_benign_flagged"] == pytest.approx(2 / len(benign))
    assert figures["forged_benign_flagged"] == 1.0
    assert figures["everyday_accuracy_low"] < figures["everyday_accuracy"] < figures["everyday_accuracy_high"]

    answers_all = levers.everyday_figures(ListChecker(refuse=set()), everyday)
    assert answers_all["everyday_harmful_refused"] == 0.0 and answers_all["everyday_benign_flagged"] == 0.0
    assert answers_all["forged_benign_flagged"] == 1.0  # the forged turn alone is what the checker refuses
