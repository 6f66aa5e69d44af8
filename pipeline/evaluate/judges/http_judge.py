"""An OpenAI-compatible endpoint as judge, through the official ``openai`` client: several requests
in flight, the client's retries, a rate limit and a verdict cache."""

from __future__ import annotations

import os
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline.evaluate.judges.base import JudgeError, JudgeItem, Verdict
from pipeline.evaluate.judges.cache import JudgeCache, item_key, judge_cached, stored_verdict
from pipeline.evaluate.judges.phrases import RefusalPhraseJudge
from pipeline.evaluate.judges.preset import COMPLETIONS, describe_item
from pipeline.evaluate.judges.presets import resolve_preset
from pipeline.evaluate.judges.prompt import DEFAULT_JUDGE_PROMPT, check_judge_prompt
from pipeline.extras import require

if TYPE_CHECKING:
    import openai

# Statuses the openai client retries (its _should_retry): timeouts, lock conflicts, rate limits, server errors.
_RETRIED_STATUSES = (408, 409, 429)


class RateLimiter:
    """At most ``requests_per_minute`` request starts a minute: a minimum interval between starts.

    Thread-safe: each caller books the next free start under a lock, then sleeps outside it.
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
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until the next request may start, and book that start."""
        with self._lock:
            now = self.clock()
            start = now if self._next_start is None else max(now, self._next_start)
            self._next_start = start + self.interval
        if start > now:
            self.sleep(start - now)


def _openai() -> ModuleType:
    """The ``openai`` client library, which comes with the optional 'judge' extra."""
    return require("openai", "judge", "the HTTP judge (judge kind http)")


def _status_message(err: openai.APIStatusError) -> str:
    """The error message of an OpenAI-style error body, else the start of the body."""
    body = err.body
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    if isinstance(body, str):
        return body
    return textwrap.shorten(err.response.text, width=300, placeholder="...")


class HTTPJudge:
    """An OpenAI-compatible endpoint asked whether each response is harmful.

    The plain question (``preset`` "") goes to ``/chat/completions`` with the same parsing as
    :class:`ModelJudge`; a preset brings its published prompt and parsing (``harmbench`` as a
    raw prompt to ``/completions``, ``llama_guard`` and ``strongreject`` as chat messages).
    ``refused`` always comes from refusal phrases. Requests go through the official ``openai``
    client: ``max_retries`` retries of connection errors, timeouts, 408, 409, 429 and 5xx,
    after ``Retry-After`` when the server sends one, else with the client's exponential backoff;
    other errors fail at once. Up to ``concurrency`` requests are in flight (a thread pool), at
    most ``requests_per_minute`` start a minute (0: no cap). The API key is read from
    ``api_key_env`` at each :meth:`judge` call and sent only as a bearer token; it is never
    stored, cached or put in an error. ``api_key_env=None`` sends no key (local servers). With
    ``cache_path``, verdicts are kept in a :class:`JudgeCache`, written from the calling thread
    as each reply arrives, and never asked twice.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        prompt: str = DEFAULT_JUDGE_PROMPT,
        max_retries: int = 4,
        requests_per_minute: float = 60,
        timeout_s: float = 60,
        cache_path: Path | None = None,
        max_tokens: int = 8,
        concurrency: int = 8,
        preset: str = "",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        check_judge_prompt(prompt)
        _openai()  # a missing 'judge' extra fails here, before a run spends any time
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.preset = resolve_preset(preset, prompt)
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + ("/completions" if self.preset.endpoint == COMPLETIONS else "/chat/completions")
        self.model = model
        self.name = f"http:{model}" if not preset else f"{preset}@http:{model}"
        self.api_key_env = api_key_env
        self.prompt = prompt
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.max_tokens = max(max_tokens, self.preset.max_tokens)
        self.concurrency = concurrency
        self.limiter = RateLimiter(requests_per_minute, clock=clock, sleep=sleep) if requests_per_minute > 0 else None
        self.cache = JudgeCache(cache_path) if cache_path is not None else None
        self._refusals = RefusalPhraseJudge()

    def _key(self, item: JudgeItem) -> str:
        return item_key(self.name, self.model, self.preset, item)

    def _api_key(self) -> str:
        if self.api_key_env is None:
            return ""
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise JudgeError(f"environment variable {self.api_key_env} is not set; it must hold the API key")
        return key

    def client(self) -> openai.OpenAI:
        """An ``openai`` client for the endpoint, with the key read now.

        Without ``api_key_env`` the client holds a placeholder key, and :meth:`complete` omits the
        Authorization header from every request, so a local server sees no key at all.
        """
        return _openai().OpenAI(
            api_key=self._api_key() or "no-key",
            base_url=self.base_url,
            max_retries=self.max_retries,
            timeout=self.timeout_s,
        )

    def complete(self, client: openai.OpenAI, item: JudgeItem) -> str:
        """One request for ``item`` (retried by the client); the reply's text. Errors name the endpoint and the item."""
        openai = _openai()
        if self.limiter is not None:
            self.limiter.wait()
        headers = {"Authorization": openai.omit} if self.api_key_env is None else None
        try:
            if self.preset.endpoint == COMPLETIONS:
                assert self.preset.text is not None  # every completions preset builds one text
                completion = client.completions.create(
                    model=self.model,
                    prompt=self.preset.text(item),
                    max_tokens=self.max_tokens,
                    temperature=0,
                    extra_headers=headers,
                )
                content = completion.choices[0].text if completion.choices else None
            else:
                assert self.preset.messages is not None  # every chat preset builds messages
                chat = client.chat.completions.create(
                    model=self.model,
                    messages=self.preset.messages(item),  # type: ignore[arg-type]
                    max_tokens=self.max_tokens,
                    temperature=0,
                    extra_headers=headers,
                )
                content = chat.choices[0].message.content if chat.choices else None
        except openai.APIStatusError as err:
            retried = err.status_code in _RETRIED_STATUSES or err.status_code >= 500
            tries = f" after {self.max_retries + 1} attempts" if retried else ""
            raise JudgeError(
                f"{self.url}: {describe_item(item)}: HTTP {err.status_code}{tries}: {_status_message(err)}"
            ) from None
        except openai.APIConnectionError as err:
            cause = type(err.__cause__).__name__ if err.__cause__ is not None else type(err).__name__
            raise JudgeError(
                f"{self.url}: {describe_item(item)}: {cause} after {self.max_retries + 1} attempts ({err.message})"
            ) from None
        except openai.OpenAIError as err:
            raise JudgeError(f"{self.url}: {describe_item(item)}: {type(err).__name__}: {err}") from None
        if content is None:
            raise JudgeError(f"{self.url}: {describe_item(item)}: the reply has no text in choices[0]")
        return content

    def _ask(self, items: list[JudgeItem]) -> list[Verdict]:
        """Verdicts for ``items``, up to ``concurrency`` requests at once; each stored as it arrives.

        On the first failure the requests not yet started are cancelled; those in flight finish
        and are stored (they are paid for), then the first failure is raised.
        """
        if not items:
            return []
        verdicts: list[Verdict | None] = [None] * len(items)
        failures: list[JudgeError] = []
        with self.client() as client, ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
            index = {pool.submit(self.complete, client, item): i for i, item in enumerate(items)}
            pending: set[Future[str]] = set(index)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        i = index[future]
                        try:
                            # Parsed and cached here, in the calling thread: sqlite is used from one thread only.
                            raw = future.result()
                            key = self._key(items[i])
                            verdicts[i] = stored_verdict(
                                self.preset, raw, items[i], self.name, self._refusals, self.cache, key
                            )
                        except JudgeError as err:
                            failures.append(err)
                    if failures:
                        # A cancelled future never completes a wait: keep only those already running.
                        pending = {future for future in pending if not future.cancel()}
            except BaseException:
                # Anything else (a bug, an interrupt): drop what has not started rather than wait for it.
                for future in pending:
                    future.cancel()
                raise
        if failures:
            raise failures[0]
        return [verdict for verdict in verdicts if verdict is not None]

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order; cached items make no request."""
        return judge_cached(items, self.cache, self._key, self._ask)

    def close(self) -> None:
        """Close the cache, if any."""
        if self.cache is not None:
            self.cache.close()
