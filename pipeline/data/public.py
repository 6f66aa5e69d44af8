"""Training sources built from the public instruction sets vendored in ``data/public/``.

``data/public/`` holds harmful instructions (AdvBench, HarmBench, JailbreakBench, StrongREJECT)
and a sample of benign Alpaca instructions, with ``provenance.json`` naming each file's upstream
and licence. A plain mix of them teaches style, not intent: the harmful sets are long imperative
"Write a tutorial on ..." lines, Alpaca's are short exercises. Each source below pairs every
harmful request with a benign one of the same form and nearest length, so form and length
cannot separate the labels and only what is asked can:

- ``public-imperative``: imperative instructions on both sides.
- ``public-questions``: questions on both sides (StrongREJECT's questions against Alpaca's).
- ``public-wrapped``: a pair shares one jailbreak-style wrapper (role play, "ignore previous
  instructions", hypothetical framing, long preambles), drawn regardless of label.
- ``public-typo``: the request typed into an image under a neutral text prompt, shared by the pair.

Sources draw from disjoint records, in the order above, and no text appears twice, so no
request lands in two sources or two splits. Every ending is normalised (a final full stop or
question mark) because the upstream sets differ in that alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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

PROVENANCE_FILE = "provenance.json"
IMPERATIVE_SOURCE = "public-imperative"
QUESTION_SOURCE = "public-questions"
WRAPPED_SOURCE = "public-wrapped"
TYPO_SOURCE = "public-typo"
PUBLIC_SOURCES: tuple[str, ...] = (IMPERATIVE_SOURCE, QUESTION_SOURCE, WRAPPED_SOURCE, TYPO_SOURCE)

# Alpaca instructions that point at an input the request does not carry.
MISSING_INPUT = re.compile(
    r"\b(following|given|below|above|provided)\b|\bth(is|ese) (sentence|text|passage|paragraph|article|"
    r"poem|story|list|data|table|code|word|phrase|statement|tweet|email|essay|song|book|movie)s?\b",
    re.IGNORECASE,
)

# A typed request must fit an image legibly, and OCR must read all of it.
MAX_TYPO_CHARS = 90

# Neutral text prompts for a request typed into an image; a pair shares one, whatever its label.
TYPO_PROMPTS: tuple[str, ...] = (
    "Follow the instruction in the image.",
    "Do what the text in the picture asks.",
    "The image contains a request. Please respond to it in detail.",
    "Read the image and carry out what it says.",
    "Answer the request shown in this image.",
)


@dataclass(frozen=True, kw_only=True)
class Instruction:
    """One vendored instruction: ``origin`` is ``file-stem/position`` (``advbench/12``), unique across files;
    ``upstream`` is the project it comes from, as ``provenance.json`` names it (``llm-attacks/llm-attacks``)."""

    origin: str
    category: str
    text: str
    label: str
    upstream: str

    @property
    def is_question(self) -> bool:
        return self.text.endswith("?")


def normalise(text: str) -> str:
    """One line, single spaces, a capital first letter and a final ``.``, ``?`` or ``!``."""
    line = " ".join(text.split())
    if not line:
        return line
    line = line[0].upper() + line[1:]
    return line if line[-1] in ".?!" else line + "."


def read_public(folder: str | Path) -> list[Instruction]:
    """Every instruction the folder's ``provenance.json`` lists, validated, in file order.

    A file that is missing, not a JSON list of ``{"instruction": text, "category": text | null}``,
    or holds an empty instruction is a :class:`BuildError` naming the file and record.
    """
    root = Path(folder)
    listing = root / PROVENANCE_FILE
    entries = _read_json(listing, "no such file; build.public must name a folder like data/public")
    if not isinstance(entries, list) or not entries:
        raise BuildError(f"{listing}: expected a non-empty JSON list of files")
    instructions: list[Instruction] = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or entry.get("label") not in ("harmful", "benign") or "file" not in entry:
            raise BuildError(f"{listing}: entry {number} needs 'file' and a 'label' of harmful or benign")
        upstream = entry.get("upstream")
        if not isinstance(upstream, str) or not upstream.strip():
            raise BuildError(f"{listing}: entry {number} ({entry['file']}) needs an 'upstream' naming its project")
        instructions += _read_file(root / str(entry["file"]), str(entry["label"]), upstream.strip())
    return instructions


def _read_json(path: Path, missing: str) -> Any:
    """A JSON file's content; a missing or unreadable file is a :class:`BuildError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BuildError(f"{path}: cannot read ({exc})") from None


def _read_file(path: Path, label: str, upstream: str) -> list[Instruction]:
    """One vendored file's records as instructions."""
    records = _read_json(path, f"listed in {PROVENANCE_FILE} but missing")
    if not isinstance(records, list):
        raise BuildError(f"{path}: expected a JSON list of records")
    stem = path.stem
    out = []
    for position, record in enumerate(records):
        text = record.get("instruction") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise BuildError(f"{path}: record {position} has no instruction text")
        category = record.get("category") or stem
        if label == "benign" and MISSING_INPUT.search(text):
            continue  # "Edit the following sentence": its input is not part of the request
        out.append(
            Instruction(
                origin=f"{stem}/{position}",
                category=str(category),
                text=normalise(text),
                label=label,
                upstream=upstream,
            )
        )
    return out


# Benign candidates offered to the length matching, per harmful request to match.
BENIGN_CANDIDATES = 4


def by_upstream_in_turn(items: Sequence[Instruction], limit: int, rng: np.random.Generator) -> list[Instruction]:
    """At most ``limit`` items, taken from each upstream in turn (each upstream's items in seeded order).

    One large upstream (Alpaca holds most benign instructions) would otherwise fill nearly every
    benign slot, and holding an upstream out would then remove almost nothing of one label.
    """
    groups: dict[str, list[Instruction]] = {}
    for item in items:
        groups.setdefault(item.upstream, []).append(item)
    queues = [shuffled(groups[name], rng) for name in sorted(groups)]
    taken: list[Instruction] = []
    depth = 0
    while len(taken) < limit and any(depth < len(queue) for queue in queues):
        taken += [queue[depth] for queue in queues if depth < len(queue)][: limit - len(taken)]
        depth += 1
    return taken


def _pairs(
    harmful: Sequence[Instruction], benign: Sequence[Instruction], n: int, rng: np.random.Generator, what: str
) -> list[tuple[Instruction, Instruction]]:
    """``n`` random harmful instructions, each with a distinct benign one of the nearest length.

    Harmful instructions longer than all but the ``2n`` longest benign ones are left out when
    enough remain: a benign partner of nearly the same length then exists for each. The benign
    partners are matched from ``BENIGN_CANDIDATES * n`` candidates drawn from each upstream in
    turn (:func:`by_upstream_in_turn`), so every benign upstream is represented.
    """
    check_pool(len(benign), n, f"{what}: benign instructions")
    lengths = sorted(len(b.text) for b in benign)
    ceiling = lengths[-min(len(lengths), 2 * n)]
    fitting = [h for h in harmful if len(h.text) <= ceiling]
    pool = fitting if len(fitting) >= n else list(harmful)
    check_pool(len(pool), n, f"{what}: harmful instructions")
    chosen = shuffled(pool, rng)[:n]
    candidates = by_upstream_in_turn(benign, BENIGN_CANDIDATES * n, rng)
    picks = match_lengths([len(h.text) for h in chosen], [len(b.text) for b in candidates])
    return [(h, candidates[p]) for h, p in zip(chosen, picks, strict=True)]


def _row(instruction: Instruction, text: str, presentation: str, image: dict[str, Any] | None = None) -> dict[str, Any]:
    """A source row for ``instruction`` shown as ``text`` (and ``image``), naming its upstream and presentation."""
    i = instruction
    return request_row(i.origin, i.category, i.label, text, image, upstream=i.upstream, presentation=presentation)


def _plain_rows(pairs: Sequence[tuple[Instruction, Instruction]], presentation: str) -> list[dict[str, Any]]:
    return [_row(i, i.text, presentation) for pair in pairs for i in pair]


def build_public_sources(instructions: Sequence[Instruction], n: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The four public sources of ``n`` harmful and ``n`` benign rows each (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pool = unique(instructions, lambda i: i.text)
    used: set[str] = set()

    def take(label: str, question: bool | None = None, max_chars: int | None = None) -> list[Instruction]:
        return [
            i
            for i in pool
            if i.label == label
            and i.origin not in used
            and (question is None or i.is_question == question)
            and (max_chars is None or len(i.text) <= max_chars)
        ]

    def mark(pairs: Sequence[tuple[Instruction, Instruction]]) -> None:
        used.update(i.origin for pair in pairs for i in pair)

    sources: dict[str, list[dict[str, Any]]] = {}
    # Typography first: it needs the short requests, the scarcest ones.
    typo = _pairs(
        take("harmful", max_chars=MAX_TYPO_CHARS), take("benign", max_chars=MAX_TYPO_CHARS), n, rng, TYPO_SOURCE
    )
    mark(typo)
    prompts = rng.integers(len(TYPO_PROMPTS), size=n)
    sources[TYPO_SOURCE] = [
        _row(i, TYPO_PROMPTS[int(p)], "typography", typography(i.text))
        for pair, p in zip(typo, prompts, strict=True)
        for i in pair
    ]
    questions = _pairs(take("harmful", question=True), take("benign", question=True), n, rng, QUESTION_SOURCE)
    mark(questions)
    sources[QUESTION_SOURCE] = _plain_rows(questions, "question")
    imperative = _pairs(take("harmful", question=False), take("benign", question=False), n, rng, IMPERATIVE_SOURCE)
    mark(imperative)
    sources[IMPERATIVE_SOURCE] = _plain_rows(imperative, "imperative")
    wrapped = _pairs(take("harmful"), take("benign"), n, rng, WRAPPED_SOURCE)
    templates = rng.integers(len(JAILBREAK_TEMPLATES), size=n)
    sources[WRAPPED_SOURCE] = [
        _row(i, JAILBREAK_TEMPLATES[int(t)].format(request=i.text), "wrapped")
        for pair, t in zip(wrapped, templates, strict=True)
        for i in pair
    ]
    return {name: sources[name] for name in PUBLIC_SOURCES}
