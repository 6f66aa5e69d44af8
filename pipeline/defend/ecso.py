"""ECSO, "eyes closed, safety on": the training-free baseline defence.

Per request, with the model's own generation (``ECSOConfig.decoding``, greedy by default):

1. answer the request with the image;
2. ask the model, with the image, whether that answer is harmful (only "yes" counts; always greedy);
3. if harmful and there is an image, caption it with the request in mind;
4. if harmful, answer again from the caption alone, without the image, asking for a safe answer.

Each step is one batched ``generate`` call over the requests that need it, and every step's
output and its share of the step's time are kept, so a user can see why a response changed and
what it cost.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.config import GREEDY, Decoding, ECSOConfig
from pipeline.models.base import ModelAdapter, Request

# ECSORecord.seconds keys, one per step (only the steps that ran for a request appear).
STEP_ANSWER, STEP_CHECK, STEP_CAPTION, STEP_SAFE_ANSWER = "answer", "harm_check", "caption", "answer_from_caption"

NO_IMAGE_CAPTION = "(no image)"

_PLACEHOLDER = re.compile(r"\{(q|answer|caption)\}")

# Each prompt is useless without the values it must show the model.
_REQUIRED_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "harm_check_prompt": ("{answer}",),
    "caption_prompt": ("{q}",),
    "answer_from_caption_prompt": ("{q}", "{caption}"),
}


@dataclass(frozen=True, kw_only=True)
class ECSORecord:
    """Every step's output for one request.

    ``caption`` is None when no caption was asked for (judged safe, or no image).
    ``final_answer`` is the first answer when the request was judged safe. ``seconds`` holds each
    step this request went through and its share of that batched step's time (a step's wall time
    divided evenly over the requests in it); step 1 is absent when its answer was given to
    :meth:`ECSO.run`.
    """

    answer: str
    harm_check_raw: str
    judged_harmful: bool
    caption: str | None
    final_answer: str
    changed: bool
    seconds: dict[str, float] = field(default_factory=dict)


def fill(template: str, **values: str) -> str:
    """Fill ``{q}``, ``{answer}`` and ``{caption}`` in one pass.

    One pass (not ``str.format`` or chained ``replace``) so braces or placeholder-like text inside
    a model's answer are never themselves substituted.
    """
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


def is_yes(raw: str) -> bool:
    """True only when the first word, case-folded and stripped of punctuation, is "yes"."""
    words = raw.split()
    return bool(words) and words[0].strip(string.punctuation).lower() == "yes"


def check_prompts(config: ECSOConfig) -> None:
    """Refuse ECSO prompts that lack a placeholder they need, naming the key."""
    for key, needed in _REQUIRED_PLACEHOLDERS.items():
        template = getattr(config, key)
        missing = [p for p in needed if p not in template]
        if missing:
            raise ValueError(f"ecso.{key} must contain {' and '.join(missing)}, got {template!r}")


def _generate(adapter: ModelAdapter, requests: list[Request], max_new_tokens: int, decoding: Decoding) -> list[str]:
    """One batched call; no call at all for an empty batch; a short reply is an error, not a misalignment."""
    if not requests:
        return []
    outputs = adapter.generate(requests, max_new_tokens, decoding)
    if len(outputs) != len(requests):
        raise RuntimeError(f"model returned {len(outputs)} answers for {len(requests)} requests")
    return list(outputs)


class ECSO:
    """The ECSO defence around one model, with its prompts and decoding taken from :class:`ECSOConfig`.

    ``clock`` times each step (injectable so tests can check the accounting exactly).
    """

    def __init__(
        self, adapter: ModelAdapter, config: ECSOConfig, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        check_prompts(config)
        self.adapter = adapter
        self.config = config
        self.clock = clock

    def _step(
        self,
        name: str,
        requests: list[Request],
        tokens: int,
        decoding: Decoding,
        seconds: list[dict[str, float]],
        members: Sequence[int],
    ) -> list[str]:
        """One batched step over ``requests`` (for the records at ``members``), its time shared among them."""
        started = self.clock()
        outputs = _generate(self.adapter, requests, tokens, decoding)
        if members:
            share = (self.clock() - started) / len(members)
            for i in members:
                seconds[i][name] = share
        return outputs

    def run(self, requests: Sequence[Request], answers: Sequence[str] | None = None) -> list[ECSORecord]:
        """Run all four steps on a batch of requests; one record per request, in order.

        ``answers``, when given, are step 1's answers already generated (the guard's answer from
        its shared prefix cache, or the undefended answer of a comparison), so the model is not
        asked the same thing twice. They must come from the same decoding as ``config.decoding``
        for the records to mean what they say.
        """
        requests = list(requests)
        cfg, tokens = self.config, self.config.max_new_tokens
        everyone = range(len(requests))
        seconds: list[dict[str, float]] = [{} for _ in requests]

        # Step 1: the undefended answer, image included.
        if answers is None:
            answers = self._step(STEP_ANSWER, requests, tokens, cfg.decoding, seconds, everyone)
        elif len(answers) != len(requests):
            raise ValueError(f"got {len(answers)} first answers for {len(requests)} requests")
        answers = list(answers)

        # Step 2: the model judges its own answer, still seeing the image.
        checks = [
            Request(text=fill(cfg.harm_check_prompt, q=r.text, answer=a), image=r.image)
            for r, a in zip(requests, answers, strict=True)
        ]
        # Only the first word of the verdict counts, so a short budget loses nothing; greedy, so
        # the same answer always gets the same verdict.
        raws = self._step(STEP_CHECK, checks, cfg.judge_max_new_tokens, GREEDY, seconds, everyone)
        harmful = [is_yes(raw) for raw in raws]

        # Step 3: caption only what was judged harmful and has an image to describe.
        to_caption = [i for i, r in enumerate(requests) if harmful[i] and r.image is not None]
        caption_requests = [
            Request(text=fill(cfg.caption_prompt, q=requests[i].text), image=requests[i].image) for i in to_caption
        ]
        captions: list[str | None] = [None] * len(requests)
        produced = self._step(
            STEP_CAPTION, caption_requests, cfg.caption_max_new_tokens, cfg.decoding, seconds, to_caption
        )
        for i, caption in zip(to_caption, produced, strict=True):
            captions[i] = caption

        # Step 4: eyes closed - answer from the caption alone, never passing the image.
        to_answer = [i for i in everyone if harmful[i]]
        safe_requests = [
            Request(
                text=fill(
                    cfg.answer_from_caption_prompt,
                    q=requests[i].text,
                    caption=captions[i] if captions[i] is not None else NO_IMAGE_CAPTION,
                ),
                image=None,
            )
            for i in to_answer
        ]
        finals = list(answers)
        produced = self._step(STEP_SAFE_ANSWER, safe_requests, tokens, cfg.decoding, seconds, to_answer)
        for i, final in zip(to_answer, produced, strict=True):
            finals[i] = final

        return [
            ECSORecord(
                answer=answers[i],
                harm_check_raw=raws[i],
                judged_harmful=harmful[i],
                caption=captions[i],
                final_answer=finals[i],
                changed=finals[i] != answers[i],
                seconds=seconds[i],
            )
            for i in everyone
        ]
