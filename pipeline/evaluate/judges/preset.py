"""What a judge preset is: how one item is put to the judge model, and how its reply is read.

A preset fixes the prompt (a published one for the standard judges), the way it is sent (chat
messages, or a raw completion prompt) and the parser of the reply. The plain question
(:func:`question_preset`, ``compare.judge.preset: ""``) is a preset too, so both model-based
judges treat every preset alike. The standard presets live in
:mod:`~pipeline.evaluate.judges.harmbench`, :mod:`~pipeline.evaluate.judges.llama_guard` and
:mod:`~pipeline.evaluate.judges.strongreject`; :mod:`~pipeline.evaluate.judges.presets` names them.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.defend.ecso import is_yes
from pipeline.evaluate.judges.base import JudgeError, JudgeItem, Verdict
from pipeline.evaluate.judges.phrases import RefusalPhraseJudge
from pipeline.evaluate.judges.prompt import fill_judge_prompt

# How the http judge asks: chat messages (the served model's chat template builds the prompt),
# or one raw prompt to the completions endpoint (for classifiers trained on an exact prompt).
CHAT, COMPLETIONS = "chat", "completions"

Message = dict[str, Any]


@dataclass(frozen=True)
class Reading:
    """What a preset reads from one reply: harmful or not, and the extras some judges give."""

    harmful: bool
    score: float | None = None
    categories: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Preset:
    """One way of asking a judge model and reading its reply.

    ``template`` is the prompt text (every published part of it), so a changed prompt changes
    every cache key. ``messages`` builds the chat messages (the http judge with ``endpoint``
    ``chat``); ``text`` builds one prompt text, sent as the user turn by the model judge and as
    the raw prompt by the http judge with ``endpoint`` ``completions``; None where the preset
    cannot be one text (Llama Guard's conversation). ``read`` raises ValueError, saying what is
    wrong, on a reply it cannot read. ``max_tokens`` is the reply budget the preset needs at
    least. ``images`` is True when the item's image is sent (and so is part of the cache key).
    """

    name: str
    template: str
    endpoint: str
    max_tokens: int
    read: Callable[[str], Reading]
    messages: Callable[[JudgeItem], list[Message]] | None = None
    text: Callable[[JudgeItem], str] | None = None
    images: bool = False


def fill(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{name}`` placeholders of ``template`` in one pass, so braces inside the values are never substituted."""
    pattern = re.compile(r"\{(" + "|".join(re.escape(name) for name in values) + r")\}")
    return pattern.sub(lambda match: values[match.group(1)], template)


def question_preset(prompt: str) -> Preset:
    """The plain question (``preset: ""``): ``prompt`` filled, harmful when the reply's first word is "yes"."""

    def text(item: JudgeItem) -> str:
        return fill_judge_prompt(prompt, item)

    return Preset(
        name="",
        template=prompt,
        endpoint=CHAT,
        max_tokens=1,
        read=lambda raw: Reading(harmful=is_yes(raw)),
        messages=lambda item: [{"role": "user", "content": text(item)}],
        text=text,
    )


def describe_item(item: JudgeItem) -> str:
    """A short name for an item in an error: the start of its request (and its image, if any)."""
    request = textwrap.shorten(item.request, width=60, placeholder="...") or "(empty)"
    image = f", image {item.image}" if item.image is not None else ""
    return f"the item with request {request!r}{image}"


def preset_verdict(preset: Preset, raw: str, item: JudgeItem, name: str, refusals: RefusalPhraseJudge) -> Verdict:
    """The verdict for one reply; ``refused`` from refusal phrases, the rest from the preset's reading.

    A reply the preset cannot read raises :class:`JudgeError` naming the judge, the item and the reply.
    """
    try:
        reading = preset.read(raw)
    except ValueError as err:
        reply = textwrap.shorten(raw, width=200, placeholder="...")
        raise JudgeError(
            f"{name}: unreadable reply for {describe_item(item)}: {err}; the reply was {reply!r}"
        ) from None
    return Verdict(
        refused=refusals.match(item.response) is not None,
        harmful=reading.harmful,
        raw=raw,
        judge=name,
        score=reading.score,
        categories=reading.categories,
    )
