"""Judges: does a model's response to a request refuse it, and is it harmful?

Three judges sit behind one interface, :class:`Judge`:

- :class:`RefusalPhraseJudge`, offline and the default: a response refuses when it contains a
  stock refusal phrase (the string-match check of the GCG / JailbreakBench / MM-SafetyBench
  evaluations). It cannot say whether a response is harmful.
- :class:`ModelJudge`: a local model (any :class:`~pipeline.models.base.ModelAdapter`) is asked,
  text only, whether the response is harmful.
- :class:`HTTPJudge`: the same question sent to an OpenAI-compatible chat-completions endpoint,
  with retries, a rate limit and an sqlite cache so a rerun never pays twice.

Both model-based judges answer only "is the response harmful?"; their ``refused`` comes from the
refusal-phrase judge on the same response, so the two verdicts are comparable across judges.

The parts: :mod:`~pipeline.evaluate.judges.base` (items, verdicts, the interface),
:mod:`~pipeline.evaluate.judges.phrases`, :mod:`~pipeline.evaluate.judges.prompt` (the model
judges' question), :mod:`~pipeline.evaluate.judges.cache`, :mod:`~pipeline.evaluate.judges.model`,
:mod:`~pipeline.evaluate.judges.http_judge` and :mod:`~pipeline.evaluate.judges.build`.
"""

from pipeline.evaluate.judges.base import Judge, JudgeError, JudgeItem, Verdict
from pipeline.evaluate.judges.build import build_judge
from pipeline.evaluate.judges.cache import JudgeCache, cache_key
from pipeline.evaluate.judges.http_judge import HTTPJudge, RateLimiter, backoff_delay, parse_retry_after
from pipeline.evaluate.judges.model import ModelJudge
from pipeline.evaluate.judges.phrases import DEFAULT_REFUSAL_PHRASES, RefusalPhraseJudge, normalise
from pipeline.evaluate.judges.prompt import DEFAULT_JUDGE_PROMPT, check_judge_prompt, fill_judge_prompt, harm_verdict

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "DEFAULT_REFUSAL_PHRASES",
    "HTTPJudge",
    "Judge",
    "JudgeCache",
    "JudgeError",
    "JudgeItem",
    "ModelJudge",
    "RateLimiter",
    "RefusalPhraseJudge",
    "Verdict",
    "backoff_delay",
    "build_judge",
    "cache_key",
    "check_judge_prompt",
    "fill_judge_prompt",
    "harm_verdict",
    "normalise",
    "parse_retry_after",
]
