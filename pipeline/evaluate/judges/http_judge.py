"""An OpenAI-compatible chat-completions endpoint as judge: retries, a rate limit and a verdict cache."""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from pipeline.evaluate.judges.base import JudgeError, JudgeItem, Verdict
from pipeline.evaluate.judges.cache import JudgeCache, cache_key, judge_cached, stored_verdict
from pipeline.evaluate.judges.phrases import RefusalPhraseJudge
from pipeline.evaluate.judges.prompt import DEFAULT_JUDGE_PROMPT, check_judge_prompt, fill_judge_prompt


class RateLimiter:
    """At most ``requests_per_minute`` request starts a minute: a minimum interval between starts.

    ``clock`` and ``sleep`` are injectable so tests run on a fake clock.
    """

    def __init__(
        self,
        requests_per_minute: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be > 0, got {requests_per_minute}")
        self.interval = 60.0 / requests_per_minute
        self.clock = clock
        self.sleep = sleep
        self._next_start: float | None = None

    def wait(self) -> None:
        """Block until the next request may start, and book that start."""
        now = self.clock()
        if self._next_start is not None and now < self._next_start:
            self.sleep(self._next_start - now)
            now = self._next_start
        self._next_start = now + self.interval


_RETRY_BASE_S = 0.5
_RETRY_CAP_S = 30.0
_RETRY_AFTER_CAP_S = 300.0


def backoff_delay(attempt: int) -> float:
    """Exponential backoff before retry ``attempt`` (0-based): 0.5 s, 1 s, 2 s, ... capped at 30 s."""
    return min(_RETRY_BASE_S * 2.0**attempt, _RETRY_CAP_S)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP_S)


def _error_message(response: httpx.Response) -> str:
    """The error message of an OpenAI-style error body, else the start of the body."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "message" in body:
            return str(body["message"])
    return response.text[:500]


class HTTPJudge:
    """An OpenAI-compatible chat-completions endpoint asked whether each response is harmful.

    Same question and parsing as :class:`ModelJudge` (``refused`` from refusal phrases). The API
    key is read from ``api_key_env`` at each call and sent only as a bearer token; it is never
    stored, cached or put in an error. ``api_key_env=None`` sends no key (local servers).
    Connection errors, timeouts, 429 and 5xx are retried up to ``max_retries`` times with
    exponential backoff, or after ``Retry-After`` when the server gives one; other 4xx fail at
    once. With ``cache_path``, verdicts are kept in a :class:`JudgeCache` and never asked twice.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        prompt: str = DEFAULT_JUDGE_PROMPT,
        max_retries: int = 4,
        requests_per_minute: float = 60,
        timeout_s: float = 60,
        cache_path: Path | None = None,
        max_tokens: int = 8,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        check_judge_prompt(prompt)
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"http:{model}"
        self.api_key_env = api_key_env
        self.prompt = prompt
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.sleep = sleep
        self.limiter = RateLimiter(requests_per_minute, clock=clock, sleep=sleep)
        self.cache = JudgeCache(cache_path) if cache_path is not None else None
        self._refusals = RefusalPhraseJudge()

    def _key(self, item: JudgeItem) -> str:
        return cache_key(self.name, self.model, self.prompt, item.request, item.response)

    def _headers(self) -> dict[str, str]:
        if self.api_key_env is None:
            return {}
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise JudgeError(f"environment variable {self.api_key_env} is not set; it must hold the API key")
        return {"Authorization": f"Bearer {key}"}

    def complete(self, client: httpx.Client, content: str) -> str:
        """One chat completion with retries; the reply's text."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            self.limiter.wait()
            try:
                response = client.post(self.url, json=body, headers=self._headers())
            except httpx.TransportError as err:
                if last:
                    raise JudgeError(f"{self.url}: {type(err).__name__} after {attempts} attempts") from None
                self.sleep(backoff_delay(attempt))
                continue
            status = response.status_code
            if status == 429 or status >= 500:
                if last:
                    raise JudgeError(f"{self.url}: HTTP {status} after {attempts} attempts: {_error_message(response)}")
                wait = parse_retry_after(response.headers.get("Retry-After"))
                self.sleep(wait if wait is not None else backoff_delay(attempt))
                continue
            if status >= 400:
                raise JudgeError(f"{self.url}: HTTP {status}: {_error_message(response)}")
            try:
                return str(response.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError) as err:
                raise JudgeError(
                    f"{self.url}: reply without choices[0].message.content: {response.text[:200]}"
                ) from err
        raise AssertionError("unreachable")  # the last attempt always returns or raises

    def _ask(self, items: list[JudgeItem]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        if not items:
            return verdicts
        with httpx.Client(timeout=self.timeout_s) as client:
            for item in items:
                raw = self.complete(client, fill_judge_prompt(self.prompt, item))
                verdicts.append(stored_verdict(raw, item, self.name, self._refusals, self.cache, self._key(item)))
        return verdicts

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order; cached items make no request."""
        return judge_cached(items, self.cache, self._key, self._ask)

    def close(self) -> None:
        """Close the cache, if any."""
        if self.cache is not None:
            self.cache.close()
