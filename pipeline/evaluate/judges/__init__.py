"""Judges: does a model's response to a request refuse it, and is it harmful?

Three judges sit behind one interface, :class:`Judge`:

- :class:`RefusalPhraseJudge`, offline and the default: a response refuses when it contains a
  stock refusal phrase (the string-match check of the GCG / JailbreakBench / MM-SafetyBench
  evaluations). It cannot say whether a response is harmful.
- :class:`ModelJudge`: a local model (any :class:`~pipeline.models.base.ModelAdapter`) is asked,
  text only, whether the response is harmful.
- :class:`HTTPJudge`: the same question sent to an OpenAI-compatible endpoint through the
  official ``openai`` client (its retries), several requests in flight, a rate limit and an
  sqlite cache so a rerun never pays twice.

Both model-based judges take a preset: the plain question (the default), or a standard judge with
its published prompt and parsing (HarmBench's classifier prompt, Llama Guard 3 / 4, StrongREJECT's
rubric). They say whether the response is harmful (StrongREJECT adds a score, Llama Guard the
hazard categories); their ``refused`` comes from the refusal-phrase judge on the same response,
so refusals are counted alike across judges.

The parts: :mod:`~pipeline.evaluate.judges.base` (items, verdicts, the interface),
:mod:`~pipeline.evaluate.judges.phrases`, :mod:`~pipeline.evaluate.judges.prompt` (the plain
question), :mod:`~pipeline.evaluate.judges.preset` (what a preset is),
:mod:`~pipeline.evaluate.judges.harmbench`, :mod:`~pipeline.evaluate.judges.llama_guard`,
:mod:`~pipeline.evaluate.judges.strongreject`, :mod:`~pipeline.evaluate.judges.presets` (them by
name), :mod:`~pipeline.evaluate.judges.cache`, :mod:`~pipeline.evaluate.judges.model`,
:mod:`~pipeline.evaluate.judges.http_judge` and :mod:`~pipeline.evaluate.judges.build`.
"""

from pipeline.evaluate.judges.base import Judge, JudgeError, JudgeItem, Verdict
from pipeline.evaluate.judges.build import build_judge
from pipeline.evaluate.judges.cache import JudgeCache, cache_key
from pipeline.evaluate.judges.http_judge import HTTPJudge, RateLimiter
from pipeline.evaluate.judges.llama_guard import LLAMA_GUARD_CATEGORIES
from pipeline.evaluate.judges.model import ModelJudge
from pipeline.evaluate.judges.phrases import DEFAULT_REFUSAL_PHRASES, RefusalPhraseJudge, normalise
from pipeline.evaluate.judges.preset import Preset, Reading
from pipeline.evaluate.judges.presets import PRESETS, resolve_preset
from pipeline.evaluate.judges.prompt import DEFAULT_JUDGE_PROMPT, check_judge_prompt, fill_judge_prompt, harm_verdict

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "DEFAULT_REFUSAL_PHRASES",
    "HTTPJudge",
    "Judge",
    "JudgeCache",
    "JudgeError",
    "JudgeItem",
    "LLAMA_GUARD_CATEGORIES",
    "ModelJudge",
    "PRESETS",
    "Preset",
    "RateLimiter",
    "Reading",
    "RefusalPhraseJudge",
    "Verdict",
    "build_judge",
    "cache_key",
    "check_judge_prompt",
    "fill_judge_prompt",
    "harm_verdict",
    "normalise",
    "resolve_preset",
]
