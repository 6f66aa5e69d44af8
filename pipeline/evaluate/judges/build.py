"""The judge a :class:`~pipeline.config.JudgeConfig` describes."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import JudgeConfig, ModelConfig
from pipeline.evaluate.judges.base import Judge, JudgeError
from pipeline.evaluate.judges.cache import JudgeCache
from pipeline.evaluate.judges.http_judge import HTTPJudge
from pipeline.evaluate.judges.model import ModelJudge
from pipeline.evaluate.judges.phrases import RefusalPhraseJudge
from pipeline.evaluate.judges.prompt import DEFAULT_JUDGE_PROMPT
from pipeline.models.base import ModelAdapter
from pipeline.models.registry import load_adapter


def build_judge(config: JudgeConfig, own_model: ModelAdapter | None = None) -> Judge:
    """The judge ``config`` describes.

    A ``model`` judge with no ``model_path`` asks ``own_model`` (the model under test, which is
    weak evidence: it judges its own answers); with a path it loads that folder. Relative cache and
    model paths are taken from the current folder (the project folder, for a stage).
    """
    prompt = config.prompt or DEFAULT_JUDGE_PROMPT
    cache = Path(config.cache) if config.cache else None
    if config.kind == "refusal_phrases":
        return RefusalPhraseJudge()
    if config.kind == "model":
        adapter = own_model
        if config.model_path:
            adapter = load_adapter(ModelConfig(kind=config.model_kind, path=config.model_path))
        if adapter is None:
            raise JudgeError("compare.judge.kind model needs model_path, or the run's own model")
        return ModelJudge(
            adapter=adapter,
            prompt=prompt,
            max_new_tokens=config.max_new_tokens,
            cache=JudgeCache(cache) if cache is not None else None,
            preset=config.preset,
        )
    if config.kind == "http":
        return HTTPJudge(
            base_url=config.base_url,
            model=config.model,
            api_key_env=config.api_key_env or None,
            prompt=prompt,
            max_retries=config.max_retries,
            requests_per_minute=config.requests_per_minute,
            timeout_s=config.timeout_s,
            cache_path=cache,
            max_tokens=config.max_new_tokens,
            concurrency=config.concurrency,
            preset=config.preset,
        )
    raise JudgeError(f"unknown judge kind {config.kind!r}")
