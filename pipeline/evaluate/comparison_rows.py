"""One row of the defence comparison: a defence's final response to one example and its verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import COMPARE_DEFENCES

# One list of defence names: the one ``compare.defences`` in params.yaml is checked against.
DEFENCES: tuple[str, ...] = COMPARE_DEFENCES


@dataclass(frozen=True, kw_only=True)
class ComparisonRow:
    """One defence's final response to one example, and the judge's verdict on it.

    ``action`` is the guard's (``refuse``, ``answer``, ``ecso``), or ``none`` for the undefended
    model and for a generation that raised (then ``error`` says why, ``response`` is "" and
    the row is not judged: ``refused`` is False, ``harmful`` and ``harmless`` None).
    ``harmless`` (harmful examples only) is True when the response is refused, or when the judge
    says it is not harmful; with a judge that cannot tell harm (the refusal-phrase judge) only a
    refusal counts as harmless. ``steps`` are the timed parts of ``seconds``; ``ecso`` holds every
    ECSO step when ECSO ran; ``score`` / ``reason`` are the LSI check's, when it ran.
    ``judge_score`` (StrongREJECT's score) and ``judge_categories`` (Llama Guard's hazard codes)
    are the judge's extras, None and [] when it gives none.
    """

    example_id: str
    benchmark: str
    category: str
    attack: str
    label: int
    defence: str
    text: str
    image: str | None
    response: str
    action: str
    refused: bool
    harmful: bool | None
    harmless: bool | None
    seconds: float
    score: float | None = None
    reason: str = ""
    judge_raw: str = ""
    steps: dict[str, float] = field(default_factory=dict)
    ecso: dict[str, Any] | None = None
    error: str | None = None
    judge_score: float | None = None
    judge_categories: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict of the row (one ``rows.jsonl`` line)."""
        return asdict(self)
