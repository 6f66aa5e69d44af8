"""Local mode as OpenAI clients rely on it, through the official ``openai`` client on loopback.

Token-by-token streaming is shown with a gated model: a forward pre-hook holds the model's
one-token decode steps once the answer's first piece is out, until the test lets it go. So the
first chunk provably reaches the client while the answer is unfinished, with no timing in the test.
Also: ``finish_reason`` and ``usage`` (answers and refusals, streamed and not), the inbound API key,
the queue gauges, and a client that disconnects mid-answer freeing the model thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from lsi_guard_app.serve.app import ServeConfig, build_app
from lsi_guard_app.serve.upstream import UpstreamConfig
from lsi_guard_app.web.app import BENIGN_EXAMPLE, HARMFUL_EXAMPLE
from pipeline.defend.guard import Guard
from pipeline.defend.usage import prompt_token_count, text_token_count
from pipeline.models.base import Request
from tests.app.serve_support import FakeUpstream, live_server
from tests.app.test_web import tiny_guard

KEY = "proxy-secret"
TOKENS = 40
WAIT_S = 60.0  # a bound on waiting for the server, never a timing under test


class DecodeGate:
    """A forward pre-hook counting one-token decode steps and holding those past ``open_steps`` until released."""

    def __init__(self) -> None:
        self.open_steps = 10**9
        self.steps = 0
        self.release = threading.Event()

    def __call__(self, _module: torch.nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[-1] != 1:
            return  # the prefix, the framings and the answer's first step pass freely
        self.steps += 1
        if self.steps > self.open_steps and not self.release.wait(WAIT_S):
            raise RuntimeError("the test never released the decode gate")

    def reset(self, open_steps: int) -> None:
        self.open_steps, self.steps = open_steps, 0
        self.release.clear()


@dataclass(frozen=True)
class Local:
    guard: Guard
    gate: DecodeGate
    answered: str
    refused: str
    url: str  # local mode behind KEY
    steps_to_first_piece: int  # one-token decode steps the answer takes before its first visible piece


@pytest.fixture(scope="module")
def local(gguf_tokenizer: PreTrainedTokenizerBase) -> Iterator[Local]:
    scout = tiny_guard(gguf_tokenizer, tau=0.5)
    scores = {text: scout.check(None, text).score for text in (HARMFUL_EXAMPLE, BENIGN_EXAMPLE)}
    high, low = sorted(scores, key=lambda text: scores[text], reverse=True)
    guard = tiny_guard(gguf_tokenizer, tau=(scores[high] + scores[low]) / 2)
    gate = DecodeGate()
    handle = guard.adapter.model.register_forward_pre_hook(gate, with_kwargs=True)
    stream = guard.generate_stream(None, low, TOKENS)
    assert stream.decision.action == "answer"
    gate.reset(10**9)
    next(iter(stream))
    steps = gate.steps
    try:
        with live_server(build_app(guard, ServeConfig(mode="local", api_key=KEY))) as url:
            yield Local(guard, gate, low, high, url, steps)
    finally:
        handle.remove()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=WAIT_S)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def gauge(url: str, name: str) -> float:
    """One gauge's value from the proxy's Prometheus text."""
    for line in httpx.get(url + "/metrics", timeout=WAIT_S).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def wait_until_idle(url: str) -> None:
    ends = time.monotonic() + WAIT_S
    while gauge(url, "lsi_guard_in_flight") or gauge(url, "lsi_guard_queued"):
        if time.monotonic() > ends:
            raise AssertionError("the model thread never went idle")
        time.sleep(0.05)


def test_tokens_arrive_before_the_answer_is_finished(local: Local) -> None:
    expected = local.guard.generate(None, local.answered, TOKENS)
    local.gate.reset(local.steps_to_first_piece)
    stream = client(local.url).chat.completions.create(
        model="m", messages=user(local.answered), stream=True, max_tokens=TOKENS, stream_options={"include_usage": True}
    )
    content: list[str] = []
    finish = None
    usage = None
    try:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if not chunk.choices:
                continue
            piece = chunk.choices[0].delta.content or ""
            if piece and not "".join(content):
                # The model is held at its next token: the answer cannot be finished yet.
                assert local.gate.steps <= local.steps_to_first_piece + 1 < TOKENS - 1
                assert gauge(local.url, "lsi_guard_in_flight") == 1
                local.gate.release.set()
            content.append(piece)
            finish = chunk.choices[0].finish_reason or finish
    finally:
        local.gate.release.set()
    assert "".join(content).strip() == expected.response
    assert finish == expected.finish_reason == "length"
    assert usage is not None and expected.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.usage.prompt_tokens, TOKENS)
    assert usage.total_tokens == expected.usage.total_tokens


def test_a_whole_answer_has_its_finish_reason_and_usage(local: Local) -> None:
    local.gate.reset(10**9)
    completion = client(local.url).chat.completions.create(model="m", messages=user(local.answered), max_tokens=5)
    prompt = prompt_token_count(local.guard.adapter, Request(text=local.answered))
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt, 5)
    assert completion.usage.total_tokens == prompt + 5


def test_an_answer_the_model_ends_itself_finishes_with_stop(local: Local) -> None:
    local.gate.reset(10**9)
    stream = local.guard.generate_stream(None, local.answered, TOKENS)
    list(stream)
    ending = stream._session.answer_token_ids[3] if stream._session else None
    assert ending is not None
    config = local.guard.adapter.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = ending  # the answer's fourth token now ends it
    try:
        completion = client(local.url).chat.completions.create(
            model="m", messages=user(local.answered), max_tokens=TOKENS
        )
    finally:
        config.eos_token_id = saved
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_a_refusal_counts_its_prompt_and_message(local: Local) -> None:
    local.gate.reset(10**9)
    refusal = local.guard.config.refusal_message
    expected = (
        prompt_token_count(local.guard.adapter, Request(text=local.refused)),
        text_token_count(local.guard.adapter, refusal),
    )
    completion = client(local.url).chat.completions.create(model="m", messages=user(local.refused))
    assert completion.choices[0].message.content == refusal
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == expected
    chunks = list(
        client(local.url).chat.completions.create(
            model="m", messages=user(local.refused), stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_a_wrong_or_missing_key_is_a_401_and_health_stays_open(local: Local) -> None:
    for key in ("wrong-key", "x" + KEY):
        with pytest.raises(openai.AuthenticationError) as caught:
            client(local.url, key).chat.completions.create(model="m", messages=user(local.answered))
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(local.url, key).models.list()
    bare = httpx.post(local.url + "/v1/chat/completions", json={"messages": user("hi")}, timeout=WAIT_S)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(local.url + "/health", timeout=WAIT_S).status_code == 200
    assert httpx.get(local.url + "/metrics", timeout=WAIT_S).status_code == 200
    assert [m.id for m in client(local.url).models.list().data] == ["tiny"]


def test_the_proxys_key_is_never_sent_upstream(local: Local) -> None:
    fake = FakeUpstream()
    with live_server(fake.app()) as upstream_url:
        config = ServeConfig(
            mode="upstream", upstream=UpstreamConfig(url=upstream_url + "/v1", timeout_s=30), api_key=KEY
        )
        with live_server(build_app(local.guard, config)) as proxy:
            completion = client(proxy).chat.completions.create(model="m", messages=user(local.answered))
            with pytest.raises(openai.AuthenticationError):
                client(proxy, "wrong").chat.completions.create(model="m", messages=user(local.answered))
    assert completion.choices[0].message.content == "echo: " + local.answered
    assert len(fake.received) == 1 and fake.received[0]["authorization"] is None


def test_a_client_that_disconnects_stops_the_answer_and_frees_the_model(local: Local) -> None:
    local.gate.reset(local.steps_to_first_piece)
    with client(local.url).chat.completions.with_streaming_response.create(
        model="m", messages=user(local.answered), stream=True, max_tokens=TOKENS
    ) as response:
        for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the first piece: the model is held at its next token; hang up
    local.gate.release.set()
    wait_until_idle(local.url)
    assert local.gate.steps < TOKENS - 1, "the answer ran on after its client had gone"
    # The model thread is free: the next request is answered in full.
    completion = client(local.url).chat.completions.create(model="m", messages=user(local.answered), max_tokens=4)
    assert completion.usage is not None and completion.usage.completion_tokens == 4


def test_the_queue_and_prefix_cache_gauges_are_exported(local: Local) -> None:
    assert gauge(local.url, "lsi_guard_queued") == 0
    assert gauge(local.url, "lsi_guard_in_flight") == 0
    # The earlier requests built and reused the model's shared prompt start.
    assert gauge(local.url, "lsi_guard_prefix_cache_entries") >= 1
    assert gauge(local.url, "lsi_guard_prefix_cache_tokens") >= 2
    assert gauge(local.url, "lsi_guard_prefix_cache_bytes") > 0
    assert gauge(local.url, "lsi_guard_prefix_cache_hits") >= 1
