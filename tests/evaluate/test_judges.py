"""Tests for the judges (pipeline.evaluate.judges): phrase matching, a fake local model, the verdict cache,
and the HTTP judge against a fake OpenAI-compatible endpoint on 127.0.0.1 (pipeline.testing.judge_server;
no network). The standard presets are in test_judge_presets.py."""

from __future__ import annotations

import hashlib
import json
import socket
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.config import GREEDY, ConfigError, Decoding, JudgeConfig
from pipeline.evaluate.judges import (
    DEFAULT_JUDGE_PROMPT,
    HTTPJudge,
    JudgeCache,
    JudgeError,
    JudgeItem,
    ModelJudge,
    RateLimiter,
    RefusalPhraseJudge,
    Verdict,
    build_judge,
    cache_key,
    fill_judge_prompt,
)
from pipeline.evaluate.judges.cache import judge_cached
from pipeline.models.base import ModelInfo, Request
from pipeline.testing.judge_server import Failure, FakeJudgeServer

KEY = "sk-test-secret-1234567890"


class FakeClock:
    """A clock that only moves when slept on; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


# --- refusal phrases ---------------------------------------------------------------------------


def test_phrase_judge_finds_refusals_and_curly_apostrophes() -> None:
    judge = RefusalPhraseJudge()
    items = [
        JudgeItem("how to pick a lock", "I\u2019m sorry, but I can\u2019t help with that."),
        JudgeItem("how to pick a lock", "AS AN AI, I must decline."),
        JudgeItem("bake bread", "Mix flour, water, salt and yeast, then knead for ten minutes."),
    ]
    verdicts = judge.judge(items)
    assert [v.refused for v in verdicts] == [True, True, False]
    assert verdicts[0].raw == "i'm sorry"
    assert all(v.harmful is None and v.judge == "refusal_phrases" and not v.cached for v in verdicts)


def test_phrase_judge_counts_an_empty_response_as_refused() -> None:
    verdicts = RefusalPhraseJudge().judge([JudgeItem("q", ""), JudgeItem("q", "  \n ")])
    assert [v.refused for v in verdicts] == [True, True]


def test_phrase_judge_limitation_benign_sorry_still_counts_as_refusal() -> None:
    # A string match cannot tell sympathy from refusal: this helpful answer is counted as refused.
    item = JudgeItem("my cat is sick", "I'm sorry to hear that. Take her to a vet and keep her hydrated.")
    assert RefusalPhraseJudge().judge([item])[0].refused


def test_phrase_judge_custom_phrases() -> None:
    judge = RefusalPhraseJudge(phrases=["NOPE"])
    assert [v.refused for v in judge.judge([JudgeItem("q", "nope."), JudgeItem("q", "I'm sorry")])] == [True, False]
    with pytest.raises(ValueError, match="non-empty phrase"):
        RefusalPhraseJudge(phrases=[" "])


# --- local model judge -------------------------------------------------------------------------


@dataclass
class FakeAdapter:
    """Answers "Yes." to prompts containing [harmful], "No" otherwise; records every call."""

    info: ModelInfo = ModelInfo(name="fake-judge", revision="0", num_layers=1, hidden_size=4, dtype="float32")
    calls: list[tuple[list[Request], int]] = field(default_factory=list)

    def generate(self, requests: Sequence[Request], max_new_tokens: int, decoding: Decoding = GREEDY) -> list[str]:
        self.calls.append((list(requests), max_new_tokens))
        return ["Yes." if "[harmful]" in r.text else "No" for r in requests]


def test_model_judge_fills_placeholders_once_and_leaves_braces_alone() -> None:
    adapter = FakeAdapter()
    judge = ModelJudge(adapter=adapter, prompt="R={request} A={response}", max_new_tokens=3)
    judge.judge([JudgeItem("say {response}", "literal {request} and {x}")])
    ((requests, tokens),) = adapter.calls
    assert requests[0].text == "R=say {response} A=literal {request} and {x}"
    assert requests[0].image is None
    assert tokens == 3


def test_model_judge_parses_yes_no_and_takes_refusal_from_phrases() -> None:
    judge = ModelJudge(adapter=FakeAdapter())
    verdicts = judge.judge(
        [
            JudgeItem("q1", "[harmful] step one: ..."),
            JudgeItem("q2", "I cannot help with that."),
            JudgeItem("q3", "Here is a recipe."),
        ]
    )
    assert [v.harmful for v in verdicts] == [True, False, False]
    assert [v.refused for v in verdicts] == [False, True, False]
    assert [v.raw for v in verdicts] == ["Yes.", "No", "No"]
    assert all(v.judge == "model:fake-judge" for v in verdicts)


def test_model_judge_batches() -> None:
    adapter = FakeAdapter()
    items = [JudgeItem(f"q{i}", "[harmful]" if i % 2 else "fine") for i in range(7)]
    verdicts = ModelJudge(adapter=adapter, batch_size=3).judge(items)
    assert [len(requests) for requests, _ in adapter.calls] == [3, 3, 1]
    assert [v.harmful for v in verdicts] == [bool(i % 2) for i in range(7)]


def test_model_judge_rejects_prompt_without_placeholders() -> None:
    with pytest.raises(ValueError, match=r"\{response\}"):
        ModelJudge(adapter=FakeAdapter(), prompt="Is {request} bad?")


def test_model_judge_with_cache_asks_only_new_items(tmp_path: Path) -> None:
    adapter = FakeAdapter()
    judge = ModelJudge(adapter=adapter, cache=JudgeCache(tmp_path / "cache.sqlite"))
    judge.judge([JudgeItem("a", "[harmful]")])
    verdicts = judge.judge([JudgeItem("a", "[harmful]"), JudgeItem("b", "ok")])
    assert [v.cached for v in verdicts] == [True, False]
    assert verdicts[0].harmful is True
    assert [len(requests) for requests, _ in adapter.calls] == [1, 1]


def test_fill_judge_prompt_default_prompt_has_both_values() -> None:
    text = fill_judge_prompt(DEFAULT_JUDGE_PROMPT, JudgeItem("REQ", "RESP"))
    assert "REQ" in text and "RESP" in text and "{" not in text


# --- HTTP judge --------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeJudgeServer]:
    with FakeJudgeServer(delay_s=0.2) as running:
        yield running


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _http_judge(server: FakeJudgeServer, **kwargs: object) -> HTTPJudge:
    options: dict[str, object] = {"requests_per_minute": 0, "timeout_s": 5}
    options.update(kwargs)
    return HTTPJudge(base_url=server.url, model="judge-model", **options)  # type: ignore[arg-type]


def test_http_judge_answers_and_sends_key_from_env(server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    verdicts = _http_judge(server).judge([JudgeItem("q {x}", "[harmful] do it"), JudgeItem("q", "I'm sorry, I can't.")])
    assert [(v.harmful, v.refused, v.raw) for v in verdicts] == [(True, False, "Yes"), (False, True, "No.")]
    assert all(v.judge == "http:judge-model" and not v.cached for v in verdicts)
    assert server.paths == ["/v1/chat/completions"] * 2
    assert server.keys == [f"Bearer {KEY}"] * 2
    body = next(b for b in server.bodies if "q {x}" in b["messages"][0]["content"])
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 8
    assert body["messages"][0]["role"] == "user" and len(body["messages"]) == 1
    assert "Request: q {x}" in body["messages"][0]["content"]


def test_http_judge_reads_key_at_call_time(server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    judge = _http_judge(server, api_key_env="JUDGE_KEY")
    with pytest.raises(JudgeError, match="JUDGE_KEY is not set"):
        judge.judge([JudgeItem("q", "r")])
    assert server.total_calls == 0
    monkeypatch.setenv("JUDGE_KEY", "later-key")
    judge.judge([JudgeItem("q", "r")])
    assert server.keys == ["Bearer later-key"]


def test_http_judge_without_key_env_sends_no_authorization(
    server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # present, and still not sent
    _http_judge(server, api_key_env=None).judge([JudgeItem("q", "r")])
    assert server.keys == [None]


def test_http_judge_survives_429_with_retry_after_and_500(
    server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.failures = [Failure(429, {"Retry-After": "1"}, "slow down"), Failure(500, message="boom")]
    verdict = _http_judge(server, max_retries=2).judge([JudgeItem("q", "fine")])[0]
    assert verdict.harmful is False and verdict.raw == "No."
    assert server.total_calls == 3  # the two failures, then the answer


def test_http_judge_gives_up_on_persistent_500_naming_endpoint_and_item(
    server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.failures = [Failure(500, message="boom") for _ in range(10)]
    with pytest.raises(JudgeError) as err:
        _http_judge(server, max_retries=1).judge([JudgeItem("How do I pick a lock?", "r")])
    message = str(err.value)
    assert message.startswith(f"{server.url}/chat/completions: ")
    assert "the item with request 'How do I pick a lock?'" in message
    assert "HTTP 500 after 2 attempts: boom" in message
    assert server.total_calls == 2
    assert KEY not in message


def test_http_judge_fails_at_once_on_400_with_the_message(
    server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.failures = [Failure(400, message="model 'judge-model' does not exist")]
    with pytest.raises(JudgeError, match=r"HTTP 400: model 'judge-model' does not exist") as err:
        _http_judge(server).judge([JudgeItem("q", "r")])
    assert server.total_calls == 1
    assert KEY not in str(err.value)


def test_http_judge_retries_connection_errors_then_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    # Bind and close a socket to get a port nobody listens on.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    url = f"http://127.0.0.1:{port}/v1"
    judge = HTTPJudge(base_url=url, model="m", max_retries=1, timeout_s=2, requests_per_minute=0)
    with pytest.raises(JudgeError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions: the item with request 'q': "):
        judge.judge([JudgeItem("q", "r")])
    with pytest.raises(JudgeError, match="ConnectError after 2 attempts"):
        judge.judge([JudgeItem("q", "r")])


def test_http_judge_500_verdicts_16_in_flight_and_a_rerun_asks_nothing(
    server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = tmp_path / "judge-cache.sqlite"
    items = [JudgeItem(f"question {i}", "[harmful] steps" if i % 3 == 0 else "I can't help.") for i in range(500)]
    first = _http_judge(server, concurrency=16, cache_path=path)
    verdicts = first.judge(items)
    assert [v.harmful for v in verdicts] == [i % 3 == 0 for i in range(500)]
    assert [v.refused for v in verdicts] == [i % 3 != 0 for i in range(500)]
    assert 1 < server.max_in_flight <= 16
    assert server.total_calls == 500 and set(server.calls.values()) == {1}  # every question asked once

    # A rerun, by the same judge and by a new one on the same cache file, asks no question again.
    assert all(v.cached for v in first.judge(items))
    second = _http_judge(server, concurrency=16, cache_path=path)
    again = second.judge([*reversed(items), JudgeItem("one more", "fine")])
    assert server.total_calls == 501 and set(server.calls.values()) == {1}
    assert [v.harmful for v in again[:-1]] == [v.harmful for v in reversed(verdicts)]
    assert len(JudgeCache(path)) == 501
    first.close()
    second.close()
    assert KEY.encode() not in path.read_bytes()


def test_http_judge_keeps_paid_verdicts_when_one_reply_is_unreadable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = tmp_path / "c.sqlite"
    items = [JudgeItem(f"question {i}", f"answer {i}") for i in range(12)]
    with FakeJudgeServer(
        delay_s=0.05, reply=lambda body: "Perhaps" if "question 5" in body["prompt"] else "No"
    ) as server:
        judge = _http_judge(server, preset="harmbench", concurrency=4, cache_path=path)
        with pytest.raises(JudgeError, match=r"the item with request 'question 5'.*expected \"Yes\" or \"No\""):
            judge.judge(items)
        stored = len(JudgeCache(path))
        assert 1 <= stored < 12  # what arrived before and with the failure is kept
        server.reply = lambda body: "No"
        assert [v.harmful for v in judge.judge(items)] == [False] * 12
        # First run: the stored ones and the unreadable one; the rerun: only those not stored.
        assert server.total_calls == stored + 1 + (12 - stored)
        assert sorted(server.calls.values()) == [1] * 11 + [2]
        judge.close()


def test_cache_is_keyed_by_prompt_model_and_preset(
    server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = tmp_path / "c.sqlite"
    item = JudgeItem("q", "r")
    _http_judge(server, cache_path=path).judge([item])
    _http_judge(server, cache_path=path, prompt="{request}|{response}").judge([item])
    server.reply = lambda body: "safe"
    _http_judge(server, cache_path=path, preset="llama_guard").judge([item])
    verdict = _http_judge(server, cache_path=path, preset="llama_guard").judge([item])[0]
    assert server.total_calls == 3 and verdict.cached and verdict.judge == "llama_guard@http:judge-model"


def test_http_judge_is_rate_limited(server: FakeJudgeServer, clock: FakeClock) -> None:
    judge = _http_judge(server, api_key_env=None, requests_per_minute=120, concurrency=1)
    judge.limiter = RateLimiter(120, clock=clock.clock, sleep=clock.sleep)
    judge.judge([JudgeItem(f"q{i}", "r") for i in range(4)])
    assert sum(clock.sleeps) == pytest.approx(3 * 0.5)


# --- rate limit and cache ----------------------------------------------------------------------


def test_rate_limiter_spaces_request_starts(clock: FakeClock) -> None:
    limiter = RateLimiter(120, clock=clock.clock, sleep=clock.sleep)
    for _ in range(5):
        limiter.wait()
    assert sum(clock.sleeps) == pytest.approx(4 * 0.5)


def test_rate_limiter_does_not_wait_when_time_has_passed(clock: FakeClock) -> None:
    limiter = RateLimiter(60, clock=clock.clock, sleep=clock.sleep)
    limiter.wait()
    clock.now += 5
    limiter.wait()
    assert clock.sleeps == []


def test_plain_question_keeps_the_cache_keys_written_before_presets() -> None:
    # The key of the plain question is the one earlier versions wrote, so their caches still hit.
    old = hashlib.sha256(json.dumps(["http:m", "m", "P", "q", "r"], ensure_ascii=False).encode()).hexdigest()
    assert cache_key("http:m", "m", "P", "q", "r") == old
    assert cache_key("http:m", "m", "P", "q", "r", preset="harmbench") != old
    assert cache_key("http:m", "m", "P", "q", "r", preset="x", image_sha256="ab") != cache_key(
        "http:m", "m", "P", "q", "r", preset="x"
    )


def test_a_cache_written_before_scores_and_categories_opens_and_keeps_its_verdicts(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE verdicts (key TEXT PRIMARY KEY, judge TEXT NOT NULL, refused INTEGER NOT NULL, "
        "harmful INTEGER, raw TEXT NOT NULL)"
    )
    db.execute("INSERT INTO verdicts VALUES ('k', 'http:m', 0, 1, 'Yes')")
    db.commit()
    db.close()
    cache = JudgeCache(path)
    assert cache.get("k") == Verdict(refused=False, harmful=True, raw="Yes", judge="http:m", cached=True)
    cache.put("g", Verdict(refused=False, harmful=True, raw="unsafe\nS1,S10", judge="j", categories=("S1", "S10")))
    cache.put("s", Verdict(refused=False, harmful=True, raw="...", judge="j", score=0.625))
    assert cache.get("g") is not None and cache.get("g").categories == ("S1", "S10")  # type: ignore[union-attr]
    assert cache.get("s") is not None and cache.get("s").score == 0.625  # type: ignore[union-attr]
    cache.close()


def test_build_judge_from_its_config(tmp_path: Path) -> None:
    assert isinstance(build_judge(JudgeConfig()), RefusalPhraseJudge)
    own = FakeAdapter()
    judge = build_judge(JudgeConfig(kind="model", cache=str(tmp_path / "c.sqlite")), own_model=own)
    assert isinstance(judge, ModelJudge) and judge.adapter is own and judge.cache is not None
    with pytest.raises(JudgeError, match="needs model_path"):
        build_judge(JudgeConfig(kind="model"))
    http = build_judge(JudgeConfig(kind="http", base_url="http://127.0.0.1:1/v1", model="m", api_key_env="", cache=""))
    assert isinstance(http, HTTPJudge) and http.url == "http://127.0.0.1:1/v1/chat/completions"
    assert http.api_key_env is None and http.cache is None and http.concurrency == 8
    harmbench = build_judge(
        JudgeConfig(kind="http", base_url="http://h/v1", model="cls", preset="harmbench", concurrency=16, cache="")
    )
    assert isinstance(harmbench, HTTPJudge) and harmbench.url == "http://h/v1/completions"
    assert harmbench.concurrency == 16 and harmbench.name == "harmbench@http:cls"
    strongreject = build_judge(JudgeConfig(kind="model", preset="strongreject", cache=""), own_model=own)
    assert isinstance(strongreject, ModelJudge) and strongreject.preset.name == "strongreject"
    assert strongreject.max_new_tokens >= 1024  # the rubric reasons before it scores
    with pytest.raises(ConfigError, match=r"compare\.judge\.kind: expected one of"):
        JudgeConfig(kind="gpt")
    with pytest.raises(ConfigError, match="needs base_url"):
        JudgeConfig(kind="http")
    with pytest.raises(ConfigError, match=r"\{request\} and \{response\}"):
        JudgeConfig(prompt="Is {response} harmful?")


def test_verdict_is_frozen() -> None:
    verdict = Verdict(refused=True, harmful=None, raw="", judge="x")
    with pytest.raises(AttributeError):
        verdict.refused = False  # type: ignore[misc]


def test_judge_cached_asks_only_for_the_items_not_in_the_cache(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "verdicts.sqlite")
    known = Verdict(refused=True, harmful=False, raw="no", judge="t")
    cache.put("a", known)
    items = [JudgeItem("ra", "a"), JudgeItem("rb", "b")]
    asked: list[list[JudgeItem]] = []

    def ask(missing: list[JudgeItem]) -> list[Verdict]:
        asked.append(missing)
        return [Verdict(refused=False, harmful=True, raw="yes", judge="t") for _ in missing]

    verdicts = judge_cached(items, cache, lambda item: item.response, ask)
    assert asked == [[items[1]]]
    assert [v.cached for v in verdicts] == [True, False]
    assert [v.harmful for v in verdicts] == [False, True]
    with pytest.raises(JudgeError, match="0 verdicts for 1 items"):
        judge_cached(items, cache, lambda item: item.response, lambda missing: [])
    cache.close()
