"""A local model asked, text only, whether each response is harmful."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.evaluate.judges.base import JudgeError, JudgeItem, Verdict
from pipeline.evaluate.judges.cache import JudgeCache, item_key, judge_cached, stored_verdict
from pipeline.evaluate.judges.phrases import RefusalPhraseJudge
from pipeline.evaluate.judges.presets import resolve_preset
from pipeline.evaluate.judges.prompt import DEFAULT_JUDGE_PROMPT, check_judge_prompt
from pipeline.models.base import ModelAdapter, Request


class ModelJudge:
    """A local model asked, text only, whether each response is harmful.

    With ``preset`` "" the question is ``prompt`` (:data:`DEFAULT_JUDGE_PROMPT` by default) and
    ``harmful`` is True only when the reply's first word is "yes"; a preset (``harmbench``,
    ``strongreject``) brings its published prompt and parsing, sent as the user turn of the
    model's chat template. ``refused`` comes from the refusal-phrase judge on the response, not
    from the model. Items go to the model in batches of ``batch_size``; with a ``cache``,
    verdicts already known are not asked again. ``max_new_tokens`` is raised to what the preset
    needs (StrongREJECT's reasoning takes hundreds of tokens).
    """

    def __init__(
        self,
        *,
        adapter: ModelAdapter,
        prompt: str = DEFAULT_JUDGE_PROMPT,
        max_new_tokens: int = 8,
        batch_size: int = 8,
        cache: JudgeCache | None = None,
        preset: str = "",
    ) -> None:
        check_judge_prompt(prompt)
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
        self.preset = resolve_preset(preset, prompt)
        if self.preset.text is None:
            raise JudgeError(f"judge preset {preset} needs the http judge: it sends a conversation, not one user turn")
        self.adapter = adapter
        self.prompt = prompt
        self.max_new_tokens = max(max_new_tokens, self.preset.max_tokens)
        self.batch_size = batch_size
        self.cache = cache
        self.model = adapter.info.name
        self.name = f"model:{self.model}" if not preset else f"{preset}@model:{self.model}"
        self._refusals = RefusalPhraseJudge()

    def _key(self, item: JudgeItem) -> str:
        return item_key(self.name, self.model, self.preset, item)

    def _ask(self, items: list[JudgeItem]) -> list[Verdict]:
        text = self.preset.text
        assert text is not None  # checked in __init__
        verdicts: list[Verdict] = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            requests = [Request(text=text(item)) for item in batch]
            raws = self.adapter.generate(requests, self.max_new_tokens)
            if len(raws) != len(batch):
                raise JudgeError(f"judge model returned {len(raws)} answers for {len(batch)} prompts")
            for item, raw in zip(batch, raws, strict=True):
                verdicts.append(
                    stored_verdict(self.preset, raw, item, self.name, self._refusals, self.cache, self._key(item))
                )
        return verdicts

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order."""
        return judge_cached(items, self.cache, self._key, self._ask)
