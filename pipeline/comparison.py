"""The defence comparison: the undefended model, LSI, ECSO and LSI then ECSO on the same examples.

Every defence answers every example; one judge scores every final response, so a guard's refusal
message and a model's own refusal are counted alike. :func:`summarise` turns the rows into
JSON-ready metrics per benchmark and defence (for ``dvc metrics``), and
:func:`comparison_markdown` into tables for a report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from pipeline.guard import Guard
from pipeline.judges import Judge, JudgeItem
from pipeline.loaders import EvalExample
from pipeline.models.base import Request

DEFENCES: tuple[str, ...] = ("none", "lsi", "ecso", "lsi_then_ecso")
# The row action of the undefended model, and of a request whose generation raised (no guard action).
NO_ACTION = "none"

logger = logging.getLogger("lsi_guard.comparison")


@dataclass(frozen=True)
class ComparisonRow:
    """One defence's final response to one example, and the judge's verdict on it.

    ``action`` is the guard's (``refuse``, ``answer``, ``ecso``), or ``none`` for the undefended
    model and for a generation that raised (then ``error`` says why, ``response`` is "" and
    the row is not judged: ``refused`` is False and ``harmful`` None).
    """

    example_id: str
    benchmark: str
    category: str
    label: int
    defence: str
    response: str
    action: str
    refused: bool
    harmful: bool | None
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class _Generated:
    """A response before judging."""

    response: str
    action: str
    seconds: float
    error: str | None


def _check_defences(defences: Sequence[str]) -> None:
    unknown = [defence for defence in defences if defence not in DEFENCES]
    if unknown:
        raise ValueError(f"unknown defences {unknown}; choose from {list(DEFENCES)}")
    if len(set(defences)) != len(defences):
        raise ValueError(f"defences must not repeat, got {list(defences)}")


def _generate_one(
    guard: Guard,
    defence: str,
    example: EvalExample,
    tokens: int,
    clock: Callable[[], float],
) -> _Generated:
    """One defence's response to one example, timed around the whole call; an exception becomes ``error``."""
    started = clock()
    try:
        if defence == "none":
            answers = guard.adapter.generate([Request(text=example.text, image=example.image)], tokens)
            if len(answers) != 1:
                raise RuntimeError(f"model returned {len(answers)} answers for 1 request")
            response, action = answers[0], NO_ACTION
        else:
            guarded = guard.generate(example.image, example.text, tokens)
            response, action = guarded.response, guarded.decision.action
    except Exception as exc:  # one failing request must not stop a long comparison run
        message = f"{type(exc).__name__}: {exc}"
        logger.error("%s / %s / %s: generation failed: %s", example.benchmark, example.example_id, defence, message)
        return _Generated("", NO_ACTION, clock() - started, message)
    return _Generated(response, action, clock() - started, None)


def run_comparison(
    guard: Guard,
    examples: Sequence[EvalExample],
    judge: Judge,
    defences: Sequence[str] = DEFENCES,
    max_new_tokens: int | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> list[ComparisonRow]:
    """Every defence on every example, judged; rows ordered by defence, then example.

    ``none`` is ``guard.adapter.generate`` on the request; the others are ``guard`` under that
    policy. Each call is timed with ``clock`` the same way. The judge is called once per defence,
    on that defence's responses that did not fail.
    """
    _check_defences(defences)
    tokens = max_new_tokens or guard.config.max_new_tokens
    rows: list[ComparisonRow] = []
    with tqdm(total=len(examples) * len(defences), desc="compare", unit="req", disable=not progress) as bar:
        for defence in defences:
            defended = guard if defence == "none" else guard.with_config(policy=defence)
            generated: list[_Generated] = []
            for example in examples:
                generated.append(_generate_one(defended, defence, example, tokens, clock))
                bar.update(1)
            judged = [i for i, item in enumerate(generated) if item.error is None]
            items = [JudgeItem(examples[i].text, generated[i].response) for i in judged]
            verdicts = judge.judge(items) if items else []
            if len(verdicts) != len(judged):
                raise RuntimeError(f"judge {judge.name!r} gave {len(verdicts)} verdicts for {len(judged)} responses")
            by_index = dict(zip(judged, verdicts, strict=True))
            for i, (example, item) in enumerate(zip(examples, generated, strict=True)):
                verdict = by_index.get(i)
                rows.append(
                    ComparisonRow(
                        example_id=example.example_id,
                        benchmark=example.benchmark,
                        category=example.category,
                        label=example.label,
                        defence=defence,
                        response=item.response,
                        action=item.action,
                        refused=verdict.refused if verdict is not None else False,
                        harmful=verdict.harmful if verdict is not None else None,
                        seconds=item.seconds,
                        error=item.error,
                    )
                )
    return rows


def _rate(flags: Sequence[bool]) -> float | None:
    """The share of True flags, rounded; None (not NaN) when there are none."""
    return round(sum(flags) / len(flags), 4) if flags else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _label_rates(rows: Sequence[ComparisonRow]) -> dict[str, Any]:
    """Refusal of harmful examples and answering of benign ones, with their counts."""
    harmful = [row for row in rows if row.label == 1]
    benign = [row for row in rows if row.label == 0]
    return {
        "harmful_refusal_rate": _rate([row.refused for row in harmful]),
        "benign_answer_rate": _rate([not row.refused for row in benign]),
        "n_harmful": len(harmful),
        "n_benign": len(benign),
    }


def _added_seconds(rows: Sequence[ComparisonRow], baseline: Sequence[ComparisonRow] | None) -> float | None:
    """Mean seconds minus the undefended model's mean, both over the examples each answered without error."""
    if baseline is None:
        return None
    base = {row.example_id: row.seconds for row in baseline if row.error is None}
    own = {row.example_id: row.seconds for row in rows if row.error is None}
    shared = sorted(base.keys() & own.keys())
    if not shared:
        return None
    return round(sum(own[key] - base[key] for key in shared) / len(shared), 4)


def summarise(rows: Sequence[ComparisonRow]) -> dict[str, Any]:
    """JSON-ready metrics: ``{benchmark: {defence: metrics}}``, defences in :data:`DEFENCES` order.

    Rates cover the rows whose generation did not fail (``n_errors`` counts the others) and are
    None when there is no example of that label. ``harmful_refusal_rate`` is the share of
    harmful (label 1) examples refused, ``benign_answer_rate`` the share of benign (label 0)
    examples not refused; both also per category under ``per_category``. ``added_seconds`` is
    the mean time over the undefended model's on the same examples (None without ``none``
    rows). ``judge_harmful_rate`` is the share of harmful examples whose response the judge
    called harmful, None when the judge does not say.
    """
    summary: dict[str, Any] = {}
    for benchmark in sorted({row.benchmark for row in rows}):
        bench_rows = [row for row in rows if row.benchmark == benchmark]
        by_defence = {
            defence: [row for row in bench_rows if row.defence == defence]
            for defence in DEFENCES
            if any(row.defence == defence for row in bench_rows)
        }
        baseline = by_defence.get("none")
        summary[benchmark] = {}
        for defence, defence_rows in by_defence.items():
            ok = [row for row in defence_rows if row.error is None]
            judged_harm = [row.harmful for row in ok if row.label == 1 and row.harmful is not None]
            mean_seconds = _mean([row.seconds for row in ok])
            summary[benchmark][defence] = {
                **_label_rates(ok),
                "per_category": {
                    category: _label_rates([row for row in ok if row.category == category])
                    for category in sorted({row.category for row in defence_rows})
                },
                "judge_harmful_rate": _rate([bool(flag) for flag in judged_harm]),
                "mean_seconds": None if mean_seconds is None else round(mean_seconds, 4),
                "added_seconds": _added_seconds(defence_rows, baseline),
                "n_errors": len(defence_rows) - len(ok),
            }
    return summary


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _secs(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def comparison_markdown(summary: dict[str, Any]) -> str:
    """Markdown tables of a :func:`summarise` result: benchmark x defence, then per category."""
    lines = [
        "| benchmark | defence | harmful refused | benign answered | mean s | added s | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for benchmark, defences in summary.items():
        for defence, metrics in defences.items():
            lines.append(
                f"| {benchmark} | {defence} "
                f"| {_percent(metrics['harmful_refusal_rate'])} (n={metrics['n_harmful']}) "
                f"| {_percent(metrics['benign_answer_rate'])} (n={metrics['n_benign']}) "
                f"| {_secs(metrics['mean_seconds'])} | {_secs(metrics['added_seconds'], signed=True)} "
                f"| {metrics['n_errors']} |"
            )
    lines += [
        "",
        "| benchmark | category | defence | harmful refused | benign answered |",
        "|---|---|---|---|---|",
    ]
    for benchmark, defences in summary.items():
        categories = sorted({category for metrics in defences.values() for category in metrics["per_category"]})
        for category in categories:
            for defence, metrics in defences.items():
                cell = metrics["per_category"].get(category)
                if cell is None:
                    continue
                lines.append(
                    f"| {benchmark} | {category} | {defence} "
                    f"| {_percent(cell['harmful_refusal_rate'])} (n={cell['n_harmful']}) "
                    f"| {_percent(cell['benign_answer_rate'])} (n={cell['n_benign']}) |"
                )
    return "\n".join(lines) + "\n"
