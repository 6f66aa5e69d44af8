"""Tests for the judges (pipeline.evaluate.judges): phrase matching, a fake local model, and an HTTP judge
against a small OpenAI-compatible server run by the test on 127.0.0.1 (no network)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    fill_judge_prompt,
    parse_retry_after,
)
from pipeline.evaluate.judges.cache import judge_cached
from pipeline.models.base import ModelInfo, Request

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
    judge = ModelJudge(adapter, prompt="R={request} A={response}", max_new_tokens=3)
    judge.judge([JudgeItem("say {response}", "literal {request} and {x}")])
    ((requests, tokens),) = adapter.calls
    assert requests[0].text == "R=say {response} A=literal {request} and {x}"
    assert requests[0].image is None
    assert tokens == 3


def test_model_judge_parses_yes_no_and_takes_refusal_from_phrases() -> None:
    judge = ModelJudge(FakeAdapter())
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
    verdicts = ModelJudge(adapter, batch_size=3).judge(items)
    assert [len(requests) for requests, _ in adapter.calls] == [3, 3, 1]
    assert [v.harmful for v in verdicts] == [bool(i % 2) for i in range(7)]


def test_model_judge_rejects_prompt_without_placeholders() -> None:
    with pytest.raises(ValueError, match=r"\{response\}"):
        ModelJudge(FakeAdapter(), prompt="Is {request} bad?")


def test_model_judge_with_cache_asks_only_new_items(tmp_path: Path) -> None:
    adapter = FakeAdapter()
    judge = ModelJudge(adapter, cache=JudgeCache(tmp_path / "cache.sqlite"))
    judge.judge([JudgeItem("a", "[harmful]")])
    verdicts = judge.judge([JudgeItem("a", "[harmful]"), JudgeItem("b", "ok")])
    assert [v.cached for v in verdicts] == [True, False]
    assert verdicts[0].harmful is True
    assert [len(requests) for requests, _ in adapter.calls] == [1, 1]


def test_fill_judge_prompt_default_prompt_has_both_values() -> None:
    text = fill_judge_prompt(DEFAULT_JUDGE_PROMPT, JudgeItem("REQ", "RESP"))
    assert "REQ" in text and "RESP" in text and "{" not in text


# --- HTTP judge --------------------------------------------------------------------------------


@dataclass
class Scripted:
    status: int
    body: dict | str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeServer:
    url: str
    script: list[Scripted] = field(default_factory=list)  # popped first; then normal answers
    seen: list[dict] = field(default_factory=list)


def _make_handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            if state.script:
                reply = state.script.pop(0)
            else:
                content = "Yes" if "[harmful]" in body["messages"][0]["content"] else "No."
                reply = Scripted(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})
            data = (reply.body if isinstance(reply.body, str) else json.dumps(reply.body)).encode()
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keeps test output quiet
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer(url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _http_judge(server: FakeServer, clock: FakeClock, **kwargs: object) -> HTTPJudge:
    options: dict[str, object] = {"requests_per_minute": 6000, "timeout_s": 5, "clock": clock.clock}
    options.update(kwargs)
    return HTTPJudge(server.url, "judge-model", sleep=clock.sleep, **options)  # type: ignore[arg-type]


def test_http_judge_answers_and_sends_key_from_env(
    server: FakeServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    verdicts = _http_judge(server, clock).judge(
        [JudgeItem("q {x}", "[harmful] do it"), JudgeItem("q", "I'm sorry, I can't.")]
    )
    assert [(v.harmful, v.refused, v.raw) for v in verdicts] == [(True, False, "Yes"), (False, True, "No.")]
    assert all(v.judge == "http:judge-model" and not v.cached for v in verdicts)
    first = server.seen[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == f"Bearer {KEY}"
    body = first["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 8
    assert body["messages"][0]["role"] == "user"
    assert "Request: q {x}" in body["messages"][0]["content"]


def test_http_judge_reads_key_at_call_time(
    server: FakeServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    judge = _http_judge(server, clock, api_key_env="JUDGE_KEY")
    with pytest.raises(JudgeError, match="JUDGE_KEY is not set"):
        judge.judge([JudgeItem("q", "r")])
    monkeypatch.setenv("JUDGE_KEY", "later-key")
    judge.judge([JudgeItem("q", "r")])
    assert server.seen[-1]["auth"] == "Bearer later-key"


def test_http_judge_retries_429_honouring_retry_after(
    server: FakeServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.script = [Scripted(429, {"error": {"message": "slow down"}}, {"Retry-After": "7"})]
    verdict = _http_judge(server, clock).judge([JudgeItem("q", "fine")])[0]
    assert verdict.harmful is False
    assert len(server.seen) == 2
    assert clock.sleeps == [7.0]


def test_http_judge_gives_up_on_persistent_500_naming_the_status(
    server: FakeServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.script = [Scripted(500, {"error": {"message": "boom"}}) for _ in range(10)]
    with pytest.raises(JudgeError, match=r"HTTP 500 after 3 attempts: boom") as err:
        _http_judge(server, clock, max_retries=2).judge([JudgeItem("q", "r")])
    assert len(server.seen) == 3
    assert clock.sleeps == [0.5, 1.0]  # exponential backoff, base 0.5 s
    assert KEY not in str(err.value)


def test_http_judge_fails_at_once_on_400_with_the_message(
    server: FakeServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.script = [Scripted(400, {"error": {"message": "model 'judge-model' does not exist"}})]
    with pytest.raises(JudgeError, match=r"HTTP 400: model 'judge-model' does not exist") as err:
        _http_judge(server, clock).judge([JudgeItem("q", "r")])
    assert len(server.seen) == 1
    assert clock.sleeps == []
    assert KEY not in str(err.value)


def test_http_judge_retries_connection_errors_then_fails(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    # Bind and close a socket to get a port nobody listens on.
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = httpd.server_address[1]
    httpd.server_close()
    judge = HTTPJudge(f"http://127.0.0.1:{port}", "m", max_retries=1, timeout_s=2, clock=clock.clock, sleep=clock.sleep)
    with pytest.raises(JudgeError, match="ConnectError after 2 attempts"):
        judge.judge([JudgeItem("q", "r")])
    assert 0.5 in clock.sleeps


def test_http_judge_cache_skips_paid_items_across_instances(
    server: FakeServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = tmp_path / "judge-cache.sqlite"
    items = [JudgeItem("q1", "[harmful] yes"), JudgeItem("q2", "I'm sorry")]
    first = _http_judge(server, clock, cache_path=path)
    fresh = first.judge(items)
    assert len(server.seen) == 2 and not any(v.cached for v in fresh)

    again = first.judge(items)
    assert len(server.seen) == 2
    assert all(v.cached for v in again)
    assert [(v.refused, v.harmful, v.raw) for v in again] == [(v.refused, v.harmful, v.raw) for v in fresh]

    # A second judge, with its own connection to the same file, sees the entries too.
    second = _http_judge(server, clock, cache_path=path)
    assert all(v.cached for v in second.judge(items))
    assert len(server.seen) == 2
    assert len(JudgeCache(path)) == 2
    first.close()
    second.close()
    assert KEY.encode() not in path.read_bytes()


def test_cache_is_keyed_by_prompt_and_model(
    server: FakeServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = tmp_path / "c.sqlite"
    _http_judge(server, clock, cache_path=path).judge([JudgeItem("q", "r")])
    _http_judge(server, clock, cache_path=path, prompt="{request}|{response}").judge([JudgeItem("q", "r")])
    assert len(server.seen) == 2


# --- rate limit and helpers --------------------------------------------------------------------


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


def test_http_judge_is_rate_limited(server: FakeServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    _http_judge(server, clock, requests_per_minute=120).judge([JudgeItem(f"q{i}", "r") for i in range(4)])
    assert sum(clock.sleeps) == pytest.approx(3 * 0.5)


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: go now


def test_build_judge_from_its_config(tmp_path: Path) -> None:
    assert isinstance(build_judge(JudgeConfig()), RefusalPhraseJudge)
    own = FakeAdapter()
    judge = build_judge(JudgeConfig(kind="model", cache=str(tmp_path / "c.sqlite")), own_model=own)
    assert isinstance(judge, ModelJudge) and judge.adapter is own and judge.cache is not None
    with pytest.raises(JudgeError, match="needs model_path"):
        build_judge(JudgeConfig(kind="model"))
    http = build_judge(JudgeConfig(kind="http", base_url="http://127.0.0.1:1/v1", model="m", api_key_env="", cache=""))
    assert isinstance(http, HTTPJudge) and http.url == "http://127.0.0.1:1/v1/chat/completions"
    assert http.api_key_env is None and http.cache is None
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
