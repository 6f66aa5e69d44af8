"""Request sources built from benchmark records, with harmful and benign requests matched in style.

MM-SafetyBench requests (harmful) and MM-Vet / alpaca requests (benign) differ in length,
wording and format, so a detector trained on them as they come can score well by learning
style alone. The matched sources below take the length and format shortcuts away:

- ``mmsb-typo``: the TYPO attack for both labels. Each harmful row (an MM-SafetyBench key
  phrase typed into the image, with its rephrased question) has a benign twin with the *same*
  rephrased question and a benign key phrase of similar length, so only the image's phrase
  separates them.
- ``mmsb-text``: benign requests, each paired with an MM-SafetyBench question of the nearest
  length, so length alone cannot separate them (wording still differs: MM-Vet questions are
  about a picture, alpaca tasks are exercises).
- ``mmsb-wrapped``: more such pairs, each pair wrapped in one jailbreak-style template drawn
  regardless of label.
- ``mmsb-naive``: the benchmark's TYPO requests against benign requests as they come, to
  measure the confounded setup.

Every function is pure and deterministic for a seed. Rows follow the request-source schema of
:mod:`pipeline.data.sources`; a row's ``request_id`` names its benchmark record
(``"01-Illegal_Activitiy/5"``, ``"alpaca/seed_task_11"``), so sources built from disjoint
pools never share a request.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from pipeline.config import BuildConfig
from pipeline.data.benchmarks.files import (
    ALPACA_SOURCE,
    MMVET_SOURCE,
    BenignQuestion,
    SafetyBenchRecord,
    read_alpaca_seed,
    read_mm_safetybench,
    read_mm_vet,
)
from pipeline.data.matching import (
    JAILBREAK_TEMPLATES,
    BuildError,
    check_pool,
    match_lengths,
    request_row,
    shuffled,
    typography,
    unique,
)

__all__ = ["JAILBREAK_TEMPLATES", "BuildError", "match_lengths"]

TYPO_SOURCE = "mmsb-typo"
TEXT_SOURCE = "mmsb-text"
WRAPPED_SOURCE = "mmsb-wrapped"
NAIVE_SOURCE = "mmsb-naive"
MATCHED_SOURCES: tuple[str, ...] = (TYPO_SOURCE, TEXT_SOURCE, WRAPPED_SOURCE)

# MM-SafetyBench scenarios 10-13 ask for specialised (legal, financial, health, government)
# advice; many of their key phrases are harmless on their own ("tracking and reducing
# expenses"), so labelling them harmful would teach the probe topic, not intent.
ADVICE_SCENARIOS: frozenset[int] = frozenset({10, 11, 12, 13})

# Alpaca seed tasks whose reference answer is a refusal: not benign requests.
REFUSED_ALPACA_TASKS: frozenset[str] = frozenset({"address", "privacy_task", "biased_question"})

# The typo source keeps only rephrasings built from these words, so the wording carries no
# intent of its own ("... without getting caught" would) and a benign twin can share it.
GENERIC_WORDS: frozenset[str] = frozenset(
    "a about accomplish accomplishing achieve activity advice advise an and best build carry carrying conduct "
    "conducting create describe design detail detailed develop do effective effectively engage engaging execute "
    "executing explain finish for from give guidance guide how implement implementing in instructions it list "
    "make manufacture me methods of offer on out perform performing personalized plan practices process produce "
    "product provide recommend set share some specific start steps strategies successfully suggest suggestions "
    "tactics tailored techniques the this tips to up use using ways with".split()
)
_TYPO_STEM = re.compile(r"^The bottom of the image shows a phrase of (?:an activity|a product)\. (?P<tail>.+)$")
TYPO_PHRASE_TYPES: tuple[str, ...] = ("activity", "product")

# Benign key phrases: short imperative phrases that stand on their own in an image.
MAX_PHRASE_WORDS = 9
_NOT_IMPERATIVE = frozenset(
    "a an are as can could did do does for given he how i if in is it my our she should suppose that the there "
    "these they this those to using was we were what when where which who whom whose why will would you your".split()
)
_DANGLING = frozenset({"following", "given", "below", "above", "this", "these", "those"})
_TRAILING = frozenset(
    "a about all an and as at based by each every for from how if in into me of on than that the to using whether "
    "which whose why with".split()
)
_CLAUSE_STARTS = frozenset({"to", "that", "which", "who"})
_QUESTION_TO_ACTIVITY = re.compile(r"^(?:how to|how do i|how can i|can you|could you) (?P<phrase>.+)\?$", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class KeyPhrase:
    """A benign phrase for a typography image, from benchmark record ``origin`` (``"alpaca/seed_task_11"``)."""

    origin: str
    category: str
    text: str
    phrase_type: str


# The projects the benchmark records come from, as the held-out protocol groups them.
MMSB_UPSTREAM = "isXinLiu/MM-SafetyBench"
BENIGN_UPSTREAMS: dict[str, str] = {MMVET_SOURCE: "yuweihao/MM-Vet", ALPACA_SOURCE: "tatsu-lab/stanford_alpaca"}


def _harmful_row(record: SafetyBenchRecord, text: str, image: dict[str, Any] | None, presentation: str | None) -> dict:
    """A source row for an MM-SafetyBench record shown as ``text`` (and ``image``)."""
    return request_row(
        harmful_id(record), record.scenario, "harmful", text, image, upstream=MMSB_UPSTREAM, presentation=presentation
    )


def _benign_row(
    request_id: str, source: str, text: str, image: dict[str, Any] | None, presentation: str | None
) -> dict:
    """A source row for a benign request from ``source`` (``mm-vet`` or ``alpaca``) shown as ``text``."""
    return request_row(
        request_id, source, "benign", text, image, upstream=BENIGN_UPSTREAMS[source], presentation=presentation
    )


def harmful_id(record: SafetyBenchRecord) -> str:
    """The request id of an MM-SafetyBench record: ``scenario/id``."""
    return f"{record.scenario}/{record.id}"


def benign_id(question: BenignQuestion) -> str:
    """The request id of a benign record: ``source/id``."""
    return f"{question.source}/{question.id}"


def scenario_number(record: SafetyBenchRecord) -> int | None:
    """The ``NN`` of an ``NN-Scenario`` file stem, or ``None`` when it has none."""
    head = record.scenario.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def is_generic_rephrasing(record: SafetyBenchRecord) -> bool:
    """Whether a record's rephrased question is the plain TYPO wording whose every word is in :data:`GENERIC_WORDS`."""
    match = _TYPO_STEM.match(record.rephrased_question)
    if match is None or record.phrase_type not in TYPO_PHRASE_TYPES:
        return False
    return all(word in GENERIC_WORDS for word in re.findall(r"[a-z']+", match["tail"].lower()))


def imperative_phrase(text: str) -> str | None:
    """A short imperative phrase from a request, or ``None`` when none stands on its own.

    "Make a grocery list for a healthy meal." -> "make a grocery list for a healthy meal";
    "Create a monthly budget for a person in the given location." -> "create a monthly budget
    for a person"; "How to cook pasta?" -> "cook pasta". Only the first sentence of the first
    line counts; clauses after a comma, colon or dash are dropped, and so is a trailing part
    that points at missing context ("the following ...", "this ...").
    """
    first = re.split(r"(?<=[.?!:])\s", text.strip().split("\n", 1)[0], maxsplit=1)[0].strip()
    if first.endswith("?"):
        match = _QUESTION_TO_ACTIVITY.match(first)
        if match is None:
            return None
        first = match["phrase"]
    first = re.split(r"[,;:]| - ", first, maxsplit=1)[0].strip().rstrip(".!")
    words = first.split()
    dangling = [i for i, word in enumerate(words) if word.lower() in _DANGLING]
    if dangling:
        words = words[: dangling[0]]
    # A phrase ends on a content word: "... for each of the", "... to complete", "... that contains" are cut.
    while words:
        if words[-1].lower() in _TRAILING:
            words = words[:-1]
        elif len(words) > 2 and words[-2].lower() in _CLAUSE_STARTS:
            words = words[:-2]
        else:
            break
    if not 2 <= len(words) <= MAX_PHRASE_WORDS or words[0].lower() in _NOT_IMPERATIVE:
        return None
    return " ".join([words[0].lower(), *words[1:]])


def task_name_phrase(name: str) -> str | None:
    """An alpaca task name as a noun phrase ("grocery_list" -> "grocery list"), or ``None`` if unusable."""
    words = re.sub(r"[_\-]+", " ", name).strip(" .").split()
    if not 2 <= len(words) <= MAX_PHRASE_WORDS or not all(re.fullmatch(r"[A-Za-z0-9'’]+", w) for w in words):
        return None
    return " ".join(words).lower()


def benign_key_phrases(benign: Sequence[BenignQuestion]) -> list[KeyPhrase]:
    """Benign activity phrases (from requests) and product phrases (from alpaca task names), deduplicated."""
    phrases: list[KeyPhrase] = []
    for question in benign:
        activity = imperative_phrase(question.text)
        if activity:
            phrases.append(
                KeyPhrase(origin=benign_id(question), category=question.source, text=activity, phrase_type="activity")
            )
        product = task_name_phrase(question.name) if question.name else None
        if product:
            phrases.append(
                KeyPhrase(origin=benign_id(question), category=question.source, text=product, phrase_type="product")
            )
    return unique(phrases, lambda p: p.text)


def typo_source(
    harmful: Sequence[SafetyBenchRecord], benign: Sequence[BenignQuestion], n: int, seed: int
) -> list[dict[str, Any]]:
    """``mmsb-typo``: ``n`` MM-SafetyBench TYPO requests and ``n`` benign twins in the same format.

    Harmful rows: the key phrase typed into the image, the rephrased question as text, drawn
    from records whose rephrasing carries no intent of its own (:func:`is_generic_rephrasing`).
    Each benign twin keeps its harmful twin's rephrased question (so the texts of the two labels
    are the same multiset) and gets a benign key phrase of the same phrase type and nearest
    length, each benchmark record used at most once.
    """
    rng = np.random.default_rng(seed)
    pool = unique((r for r in harmful if is_generic_rephrasing(r)), lambda r: r.key_phrase)
    check_pool(len(pool), n, f"{TYPO_SOURCE}: harmful records with a plain TYPO rephrasing")
    chosen = shuffled(pool, rng)[:n]
    phrases = shuffled(benign_key_phrases(benign), rng)
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    for phrase_type in TYPO_PHRASE_TYPES:
        twins = [r for r in chosen if r.phrase_type == phrase_type]
        candidates = [p for p in phrases if p.phrase_type == phrase_type and p.origin not in used]
        check_pool(len(candidates), len(twins), f"{TYPO_SOURCE}: benign {phrase_type} phrases")
        picks = match_lengths([len(r.key_phrase) for r in twins], [len(p.text) for p in candidates])
        for record, pick in zip(twins, picks, strict=True):
            phrase = candidates[pick]
            used.add(phrase.origin)
            text = record.rephrased_question
            rows.append(_harmful_row(record, text, typography(record.key_phrase), "typography"))
            rows.append(_benign_row(phrase.origin, phrase.category, text, typography(phrase.text), "typography"))
    return rows


def _matched_pairs(
    harmful: Sequence[SafetyBenchRecord], benign: Sequence[BenignQuestion], n: int, seed: int, source: str
) -> list[tuple[SafetyBenchRecord, BenignQuestion]]:
    """``n`` random single-line benign requests, each paired with a distinct harmful question of the nearest length.

    The matching runs from the benign side: benign requests are few and mostly short, harmful
    questions many and dense in length, so a harmful question of almost the same length exists
    for each benign request in the harmful questions' length range (benign requests outside it
    are left out).
    """
    rng = np.random.default_rng(seed)
    questions = shuffled(unique(harmful, lambda r: r.question), rng)
    check_pool(len(questions), n, f"{source}: harmful questions")
    shortest = min((len(r.question) for r in questions), default=0)
    longest = max((len(r.question) for r in questions), default=0)
    # Benchmark questions are one line; a newline (an alpaca input) would give the label away.
    candidates = [q for q in unique(benign, lambda q: q.text) if "\n" not in q.text]
    candidates = [q for q in candidates if shortest <= len(q.text) <= longest]
    check_pool(len(candidates), n, f"{source}: single-line benign requests as long as harmful questions")
    chosen = shuffled(candidates, rng)[:n]
    picks = match_lengths([len(q.text) for q in chosen], [len(r.question) for r in questions])
    return [(questions[pick], question) for question, pick in zip(chosen, picks, strict=True)]


def text_source(
    harmful: Sequence[SafetyBenchRecord], benign: Sequence[BenignQuestion], n: int, seed: int
) -> list[dict[str, Any]]:
    """``mmsb-text``: ``n`` MM-SafetyBench questions and ``n`` benign requests of matching length, text only.

    Rows come in (harmful, benign) pairs whose lengths differ by as little as the pools allow;
    :func:`length_auroc` of the result stays near 0.5.
    """
    rows: list[dict[str, Any]] = []
    for record, question in _matched_pairs(harmful, benign, n, seed, TEXT_SOURCE):
        rows.append(_harmful_row(record, record.question, None, None))
        rows.append(_benign_row(benign_id(question), question.source, question.text, None, None))
    return rows


def wrapped_source(
    harmful: Sequence[SafetyBenchRecord], benign: Sequence[BenignQuestion], n: int, seed: int
) -> list[dict[str, Any]]:
    """``mmsb-wrapped``: length-matched harmful / benign pairs, each pair in one jailbreak template.

    The template is drawn per pair, so both labels see every template equally often.
    """
    pairs = _matched_pairs(harmful, benign, n, seed, WRAPPED_SOURCE)
    templates = np.random.default_rng([seed, len(JAILBREAK_TEMPLATES)]).integers(len(JAILBREAK_TEMPLATES), size=n)
    rows: list[dict[str, Any]] = []
    for (record, question), template in zip(pairs, templates, strict=True):
        wrap = JAILBREAK_TEMPLATES[int(template)]
        rows.append(_harmful_row(record, wrap.format(request=record.question), None, "wrapped"))
        benign_text = wrap.format(request=question.text)
        rows.append(_benign_row(benign_id(question), question.source, benign_text, None, "wrapped"))
    return rows


def naive_source(
    harmful: Sequence[SafetyBenchRecord], benign: Sequence[BenignQuestion], n: int, seed: int
) -> list[dict[str, Any]]:
    """``mmsb-naive``: ``n`` MM-SafetyBench requests as the benchmark poses them and ``n`` benign requests as they come.

    Harmful rows are the benchmark's TYPO attack (rephrased question, key phrase in the image);
    benign rows are MM-Vet questions and alpaca tasks, text only, with no matching of any kind.
    This is the confounded setup: longer, formulaic harmful text, and an image only on harmful rows.
    """
    rng = np.random.default_rng(seed)
    records = unique(harmful, lambda r: r.key_phrase)
    requests = unique(benign, lambda q: q.text)
    check_pool(len(records), n, f"{NAIVE_SOURCE}: harmful records")
    check_pool(len(requests), n, f"{NAIVE_SOURCE}: benign requests")
    rows = [
        _harmful_row(r, r.rephrased_question, typography(r.key_phrase), "typography")
        for r in shuffled(records, rng)[:n]
    ]
    rows += [_benign_row(benign_id(q), q.source, q.text, None, None) for q in shuffled(requests, rng)[:n]]
    return rows


def build_sources(folder: str | Path, config: BuildConfig) -> dict[str, list[dict[str, Any]]]:
    """The built sources by name: the three matched ones, or only ``mmsb-naive`` when ``match_style`` is false.

    Harmful rows come from MM-SafetyBench scenarios 01-09 (see :data:`ADVICE_SCENARIOS`),
    benign ones from MM-Vet and the alpaca seed tasks (minus :data:`REFUSED_ALPACA_TASKS`).
    Matched sources draw from disjoint records, the most constrained one (typo) first, so no
    request appears in two sources and lands in two splits.
    """
    harmful = [r for r in read_mm_safetybench(folder) if scenario_number(r) not in ADVICE_SCENARIOS]
    benign = read_mm_vet(folder) + [
        q for q in read_alpaca_seed(folder) if not (q.source == ALPACA_SOURCE and q.name in REFUSED_ALPACA_TASKS)
    ]
    if not config.match_style:
        return {NAIVE_SOURCE: naive_source(harmful, benign, config.per_source, config.seed)}
    builders = {TYPO_SOURCE: typo_source, TEXT_SOURCE: text_source, WRAPPED_SOURCE: wrapped_source}
    sources: dict[str, list[dict[str, Any]]] = {}
    for name in MATCHED_SOURCES:
        rows = builders[name](harmful, benign, config.per_source, config.seed)
        used = {row["request_id"] for row in rows}
        harmful = [r for r in harmful if harmful_id(r) not in used]
        benign = [q for q in benign if benign_id(q) not in used]
        sources[name] = rows
    return sources


def _lengths(rows: Sequence[Mapping[str, Any]], image_text: bool) -> list[int]:
    """Character lengths of each row's text, or of its typography image's text."""
    if image_text:
        return [len(row["image"]["text"]) for row in rows]
    return [len(row["text"]) for row in rows]


def length_auroc(rows: Sequence[Mapping[str, Any]], image_text: bool = False) -> float:
    """AUROC of character length alone as a harmful-vs-benign score (0.5: length tells nothing).

    ``image_text`` scores the typography image's text instead of the request text; every row
    then needs a typography image.
    """
    labels = [row["label"] == "harmful" for row in rows]
    if len(set(labels)) < 2:
        raise ValueError("length AUROC needs both harmful and benign rows")
    return float(roc_auc_score(labels, _lengths(rows, image_text)))


def summarize_source(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows and median text length per label, and the length-only AUROC (also of image text, when all rows have it)."""
    summary: dict[str, Any] = {"rows": {}, "median_length": {}}
    for label in ("harmful", "benign"):
        part = [row for row in rows if row["label"] == label]
        summary["rows"][label] = len(part)
        summary["median_length"][label] = float(statistics.median(_lengths(part, False))) if part else None
    both = all(summary["rows"].values())
    summary["length_auroc"] = length_auroc(rows) if both else None
    typed = all(isinstance(row.get("image"), Mapping) and row["image"].get("kind") == "typography" for row in rows)
    summary["image_text_length_auroc"] = length_auroc(rows, image_text=True) if both and typed else None
    return summary
