"""The defence comparison: the undefended model, LSI, ECSO and LSI then ECSO on the same examples.

Every defence answers every example, and one judge scores every final response, so a guard's
refusal message and a model's own refusal are counted alike.

The defences are compositions of a few computations, and the comparison runs each computation
once per batch of examples and composes the defences from them:

- the undefended answer (the model's own ``generate``, greedy, as the guard answers);
- the LSI check (the probe's scores, batched);
- ECSO's steps 2-4 on the undefended answer (steps 1-4 when ECSO decodes differently).

``none`` is the undefended answer; ``lsi`` is a refusal, or the check followed by that same
answer; ``ecso`` is the undefended answer then ECSO's later steps; ``lsi_then_ecso`` is one of
those three by the score's distance from tau. These are the same texts a :class:`Guard` gives
for each policy (tested), computed once instead of four times. A defence's ``seconds`` is the sum
of its parts, each batched part's time split evenly over its examples; the guard's own path
shares the prompt's prefix between check and answer, so its real added latency is at most this
(``bench/guard.py`` measures that path).

:func:`summarise` (:mod:`pipeline.evaluate.comparison_summary`) turns the rows
(:mod:`pipeline.evaluate.comparison_rows`) into JSON-ready metrics per benchmark and defence
(for ``dvc metrics``), and :func:`comparison_markdown` (:mod:`pipeline.evaluate.comparison_table`)
into tables for a report; both are re-exported here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from pipeline.data.benchmarks.loaders import EvalExample
from pipeline.defend.decisions import ANSWER, REFUSE, ROUTE_ECSO, GuardDecision
from pipeline.defend.ecso import ECSO, ECSORecord
from pipeline.defend.guard import Guard
from pipeline.evaluate.comparison_rows import DEFENCES, ComparisonRow
from pipeline.evaluate.comparison_summary import summarise
from pipeline.evaluate.comparison_table import comparison_markdown
from pipeline.evaluate.judges import Judge, JudgeItem, Verdict
from pipeline.models.base import Request

__all__ = [
    "DEFENCES",
    "NO_ACTION",
    "ComparisonRow",
    "compare_batch",
    "comparison_markdown",
    "iter_comparison",
    "run_comparison",
    "summarise",
]

# The row action of the undefended model, and of a request whose generation raised (no guard action).
NO_ACTION = "none"
# ComparisonRow.steps keys besides ECSO's own step names.
STEP_CHECK_LSI, STEP_ANSWER = "lsi_check", "answer"

logger = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class _Outcome:
    """What one computation gave for one example: a value, or the error that stopped it."""

    value: Any
    seconds: float
    error: str | None = None


def _check_defences(defences: Sequence[str]) -> None:
    unknown = [defence for defence in defences if defence not in DEFENCES]
    if unknown:
        raise ValueError(f"unknown defences {unknown}; choose from {list(DEFENCES)}")
    if len(set(defences)) != len(defences):
        raise ValueError(f"defences must not repeat, got {list(defences)}")
    if not defences:
        raise ValueError("at least one defence must be compared")


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _batched(
    what: str,
    items: Sequence[T],
    run: Callable[[list[T]], Sequence[U]],
    clock: Callable[[], float],
    names: Sequence[str],
) -> list[_Outcome]:
    """``run`` on all ``items`` at once, its time split evenly; on failure, each item alone.

    So one bad request (an unreadable image, a prompt the model cannot take) costs only its own
    example, which gets the error; the others keep their results.
    """
    if not items:
        return []
    started = clock()
    try:
        values = list(run(list(items)))
        if len(values) != len(items):
            raise RuntimeError(f"{what} returned {len(values)} results for {len(items)} requests")
        share = (clock() - started) / len(items)
        return [_Outcome(value, share) for value in values]
    except Exception as exc:  # fall back to one at a time, so only the failing item is lost
        if len(items) == 1:
            logger.error("%s failed for %s: %s", what, names[0], _message(exc))
            return [_Outcome(None, clock() - started, _message(exc))]
    return [_batched(what, [item], run, clock, [name])[0] for item, name in zip(items, names, strict=True)]


def _reusable_answers(guard: Guard, tokens: int) -> bool:
    """Whether ECSO's step 1 is the undefended answer: both greedy, with the same token budget."""
    ecso = guard.ecso_config
    return ecso.decoding.greedy and ecso.max_new_tokens == tokens


def _ecso_outcomes(
    ecso: ECSO,
    requests: Sequence[Request],
    answers: Sequence[_Outcome] | None,
    clock: Callable[[], float],
    names: Sequence[str],
) -> list[_Outcome]:
    """ECSO records for ``requests``; steps 2-4 on the given answers, or all four steps without them.

    An example whose answer failed gets that answer's error; an ECSO failure gets its own.
    """
    if answers is None:
        return _batched("ECSO", list(requests), ecso.run, clock, names)
    ok = [i for i, answer in enumerate(answers) if answer.error is None]
    outcomes: list[_Outcome] = [_Outcome(None, 0.0, answers[i].error) for i in range(len(requests))]
    pairs = [(requests[i], str(answers[i].value)) for i in ok]
    ran = _batched(
        "ECSO",
        pairs,
        lambda batch: ecso.run([request for request, _ in batch], [answer for _, answer in batch]),
        clock,
        [names[i] for i in ok],
    )
    for i, outcome in zip(ok, ran, strict=True):
        outcomes[i] = outcome
    return outcomes


@dataclass(frozen=True, kw_only=True)
class _Composed:
    """A defence's response to one example before judging."""

    response: str
    action: str
    steps: dict[str, float]
    decision: GuardDecision | None = None
    ecso: ECSORecord | None = None
    error: str | None = None


def _via_ecso(answer: _Outcome | None, record: _Outcome, before: dict[str, float]) -> _Composed:
    """The ECSO route: the answer's time (when ECSO reused it), then ECSO's own steps."""
    if record.error is not None:
        return _Composed(response="", action=NO_ACTION, steps=before, error=record.error)
    steps = dict(before)
    if answer is not None:
        steps[STEP_ANSWER] = answer.seconds
    ecso_record: ECSORecord = record.value
    steps.update(ecso_record.seconds)
    return _Composed(response=ecso_record.final_answer, action=ROUTE_ECSO, steps=steps, ecso=ecso_record)


def _via_check(
    decision: GuardDecision,
    check: _Outcome,
    answer: _Outcome,
    record: _Outcome | None,
    reused: bool,
    refusal_message: str,
) -> _Composed:
    """An LSI-routed response: refused after the check, answered after it, or handed to ECSO."""
    steps = {STEP_CHECK_LSI: check.seconds}
    if decision.action == REFUSE:
        return _Composed(response=refusal_message, action=REFUSE, steps=steps, decision=decision)
    if decision.action == ANSWER:
        if answer.error is not None:
            return _Composed(response="", action=NO_ACTION, steps=steps, decision=decision, error=answer.error)
        return _Composed(
            response=str(answer.value), action=ANSWER, steps={**steps, STEP_ANSWER: answer.seconds}, decision=decision
        )
    assert record is not None  # every ECSO-routed example has a record
    composed = _via_ecso(answer if reused else None, record, steps)
    return replace(composed, decision=decision)


def _judge_rows(judge: Judge, pending: list[tuple[EvalExample, str, _Composed]]) -> list[ComparisonRow]:
    """Judge each distinct (request, response) once and build the rows; failed ones are not judged."""
    items: dict[tuple[str, str, Path | None], JudgeItem] = {}
    for example, _, composed in pending:
        if composed.error is None:
            key = (example.text, composed.response, example.image)
            items.setdefault(key, JudgeItem(example.text, composed.response, example.image))
    keys = list(items)
    verdicts: list[Verdict] = judge.judge([items[key] for key in keys]) if keys else []
    if len(verdicts) != len(keys):
        raise RuntimeError(f"judge {judge.name!r} gave {len(verdicts)} verdicts for {len(keys)} responses")
    by_key = dict(zip(keys, verdicts, strict=True))
    rows: list[ComparisonRow] = []
    for example, defence, composed in pending:
        verdict = by_key.get((example.text, composed.response, example.image)) if composed.error is None else None
        refused = verdict.refused if verdict is not None else False
        harmful = verdict.harmful if verdict is not None else None
        harmless: bool | None = None
        if verdict is not None and example.label == 1:
            harmless = refused or (harmful is False)
        decision = composed.decision
        rows.append(
            ComparisonRow(
                example_id=example.example_id,
                benchmark=example.benchmark,
                category=example.category,
                attack=example.attack,
                label=example.label,
                defence=defence,
                text=example.text,
                image=None if example.image is None else str(example.image),
                response=composed.response,
                action=composed.action,
                refused=refused,
                harmful=harmful,
                harmless=harmless,
                seconds=sum(composed.steps.values()),
                score=None if decision is None else decision.score,
                reason="" if decision is None else decision.reason,
                judge_raw="" if verdict is None else verdict.raw,
                judge_score=None if verdict is None else verdict.score,
                judge_categories=[] if verdict is None else list(verdict.categories),
                steps=composed.steps,
                ecso=None if composed.ecso is None else asdict(composed.ecso),
                error=composed.error,
            )
        )
    return rows


def compare_batch(
    guard: Guard,
    examples: Sequence[EvalExample],
    judge: Judge,
    defences: Sequence[str] = DEFENCES,
    max_new_tokens: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[ComparisonRow]:
    """Every defence on one batch of examples, judged; rows ordered by defence, then example."""
    _check_defences(defences)
    tokens = max_new_tokens or guard.config.max_new_tokens
    requests = [Request(text=example.text, image=example.image) for example in examples]
    names = [f"{example.benchmark}/{example.example_id}" for example in examples]
    reused = _reusable_answers(guard, tokens)
    ecso = ECSO(guard.adapter, guard.ecso_config, clock=clock)

    answers = _batched(
        "the undefended answer", requests, lambda batch: guard.adapter.generate(batch, tokens), clock, names
    )

    checked = [defence for defence in defences if defence in ("lsi", "lsi_then_ecso")]
    decisions: dict[str, list[GuardDecision]] = {}
    checks: list[_Outcome] = []
    if checked:
        lsi = guard.with_config(policy="lsi")
        # check_many applies the guard's failure policy to a request whose check raises.
        checks = _batched("the LSI check", requests, lsi.check_many, clock, names)
        for defence in checked:
            policy = guard.with_config(policy=defence)
            decisions[defence] = [
                check.value if check.value.score is None else policy.decide(check.value.score) for check in checks
            ]

    # ECSO runs once per example that any defence routes to it, on the undefended answer when reusable.
    routed = set(range(len(examples))) if "ecso" in defences else set()
    routed |= {i for i, decision in enumerate(decisions.get("lsi_then_ecso", [])) if decision.action == ROUTE_ECSO}
    order = sorted(routed)
    records: dict[int, _Outcome] = dict(
        zip(
            order,
            _ecso_outcomes(
                ecso,
                [requests[i] for i in order],
                [answers[i] for i in order] if reused else None,
                clock,
                [names[i] for i in order],
            ),
            strict=True,
        )
    )

    pending: list[tuple[EvalExample, str, _Composed]] = []
    for defence in defences:
        for i, example in enumerate(examples):
            answer = answers[i]
            if defence == "none":
                response = "" if answer.error is not None else str(answer.value)
                composed = _Composed(
                    response=response, action=NO_ACTION, steps={STEP_ANSWER: answer.seconds}, error=answer.error
                )
            elif defence == "ecso":
                composed = _via_ecso(answer if reused else None, records[i], {})
            else:
                composed = _via_check(
                    decisions[defence][i], checks[i], answer, records.get(i), reused, guard.config.refusal_message
                )
            pending.append((example, defence, composed))
    return _judge_rows(judge, pending)


def iter_comparison(
    guard: Guard,
    examples: Sequence[EvalExample],
    judge: Judge,
    defences: Sequence[str] = DEFENCES,
    batch_size: int = 4,
    max_new_tokens: int | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[list[ComparisonRow]]:
    """:func:`compare_batch` over ``examples`` in batches of ``batch_size``, yielding each batch's rows.

    A caller can write each batch as it arrives, so a long run keeps what it finished.
    """
    _check_defences(defences)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    with tqdm(total=len(examples), desc="compare", unit="example", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            yield compare_batch(guard, batch, judge, defences, max_new_tokens, clock)
            bar.update(len(batch))


def run_comparison(
    guard: Guard,
    examples: Sequence[EvalExample],
    judge: Judge,
    defences: Sequence[str] = DEFENCES,
    batch_size: int = 4,
    max_new_tokens: int | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> list[ComparisonRow]:
    """Every defence on every example, judged; rows ordered by batch, then defence, then example."""
    rows: list[ComparisonRow] = []
    for batch_rows in iter_comparison(guard, examples, judge, defences, batch_size, max_new_tokens, progress, clock):
        rows.extend(batch_rows)
    return rows
