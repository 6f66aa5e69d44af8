"""The proxy's HTTP app: OpenAI Chat Completions in front of a guard, in local or upstream mode.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

One request: the body is read (at most ``max_body_bytes``), parsed and validated
(:mod:`~lsi_guard_app.serve.schema`), the checked turn's image is decoded and checked against the
run's limits (:mod:`~lsi_guard_app.serve.images`), and the text against ``limits.max_request_chars``;
any problem is a 4xx in OpenAI's error shape naming the field. Then, on the model thread
(:class:`~pipeline.defend.batching.ModelWorker`):

- ``local``: :meth:`Guard.generate` answers (or refuses) with the guard's own model, the answer
  continuing from the check's cached prefix, under ``limits.request_timeout_s``. The model answers
  the checked text as one user turn (``Guard.generate`` is single-turn: earlier assistant turns are
  not replayed). ``stream: true`` streams the finished answer in word-sized chunks.
- ``upstream``: the check is scored in a micro-batch with the other waiting checks; a request that
  passes is forwarded unchanged (:mod:`~lsi_guard_app.serve.upstream`).

A refusal is an ordinary chat completion whose message is ``guard.refusal_message``. Every answer
the guard decided carries the decision as JSON in the ``X-LSI-Guard-Decision`` header; answers the
proxy writes itself (refusals, local answers) also carry it in an ``lsi_guard`` body field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import FastAPI
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from lsi_guard_app.serve.completions import DECISION_HEADER, chunks, completion, completion_id
from lsi_guard_app.serve.images import checked_image_file, data_uri_bytes, fetch_image
from lsi_guard_app.serve.metrics import CONTENT_TYPE, ServeMetrics
from lsi_guard_app.serve.schema import BadRequest, ChatRequest, CheckedTurn, checked_turn, error_body, parse_body
from lsi_guard_app.serve.upstream import Upstream, UpstreamConfig
from pipeline.data.limits import RequestTooLarge
from pipeline.defend.admission import REQUEST_LIMIT_ERRORS
from pipeline.defend.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_S, ModelWorker
from pipeline.defend.deadline import RequestTimedOut
from pipeline.defend.decisions import GuardDecision, GuardedResponse, decision_record
from pipeline.defend.guard import Guard
from pipeline.images import ImageTooLarge
from pipeline.models.base import Request

MODES = ("local", "upstream")
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_MESSAGES = 256

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How the proxy serves: mode, turn policy, batching, input bounds, and the upstream in upstream mode."""

    mode: str = "local"
    check: str = "last-user"
    upstream: UpstreamConfig | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_messages: int = DEFAULT_MAX_MESSAGES
    allow_image_urls: bool = False
    image_timeout_s: float = 10.0
    model_name: str | None = None  # the model name local mode reports (default: the guard's model)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "upstream" and self.upstream is None:
            raise ValueError("upstream mode needs an upstream URL (--upstream)")
        for name in ("max_body_bytes", "max_messages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class _Served:
    """What one request produced: the decision, and the response to send."""

    decision: GuardDecision | None
    response: Response


def build_app(
    guard: Guard,
    config: ServeConfig,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    work_dir: Path | None = None,
) -> FastAPI:
    """The proxy app for ``guard`` under ``config``; the model thread stops when the app shuts down.

    ``upstream_transport`` replaces the upstream client's network transport (tests);
    ``work_dir`` holds each request's image while it is checked (default: a temporary folder).
    """
    if config.mode == "upstream" and guard.config.policy != "lsi":
        raise ValueError(
            f"upstream mode needs guard.policy lsi, not {guard.config.policy!r}: ECSO runs the guard's own model, "
            "which does not answer in upstream mode (use --mode local, or --policy lsi)"
        )
    metrics = ServeMetrics()
    worker = ModelWorker(
        guard=guard, max_batch=config.max_batch, max_wait_s=config.max_wait_s, on_batch=metrics.record_batch
    )
    upstream = None if config.upstream is None else Upstream(config.upstream, upstream_transport)
    images = httpx.AsyncClient(timeout=httpx.Timeout(config.image_timeout_s))
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="lsi-guard-serve-")) if work_dir is None else work_dir
    model_name = config.model_name or guard.adapter.info.name

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(worker.close)
            await images.aclose()
            if upstream is not None:
                await upstream.aclose()
            if own_work:
                shutil.rmtree(work, ignore_errors=True)

    app = FastAPI(title="LSI-Guard proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.metrics = metrics

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "mode": config.mode,
            "check": config.check,
            "policy": guard.config.policy,
            "model": model_name,
            "detector": guard.detector.describe(),
            "tau": guard.tau,
        }

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: HTTPRequest) -> Response:
        if upstream is not None:
            return await upstream.models(request.headers)
        entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "lsi-guard"}
        return JSONResponse({"object": "list", "data": [entry]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        started = time.perf_counter()
        folder = Path(tempfile.mkdtemp(dir=work))
        try:
            served = await _serve(request, folder, started)
        except BadRequest as exc:
            metrics.requests.labels("bad_request").inc()
            logger.info("bad request: %s", exc.message)
            return _error_response(exc.status, exc.message, "invalid_request_error", exc.param, exc.code)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not take the server down
            metrics.requests.labels("error").inc()
            logger.exception("a chat completion request failed")
            return _error_response(
                500, f"the guard failed on this request ({type(exc).__name__}: {exc})", "server_error"
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        metrics.latency.observe(time.perf_counter() - started)
        return served.response

    async def _serve(request: HTTPRequest, folder: Path, started: float) -> _Served:
        raw = await _read_body(request, config.max_body_bytes)
        chat = await anyio.to_thread.run_sync(parse_body, raw, config.max_messages, config.allow_image_urls)
        if config.mode == "local" and chat.body.get("n") not in (None, 1):
            raise BadRequest("n must be 1 in local mode (the guard's model gives one answer)", "n")
        turn = checked_turn(chat.messages, config.check)
        where = _text_field(chat, turn)
        image = await _image_path(turn, folder)
        checked = Request(text=turn.text, image=image)
        try:
            guard.admit(checked)
        except (RequestTooLarge, ImageTooLarge) as exc:
            raise BadRequest(f"{where}: {exc}", where, "request_too_large") from None
        try:
            if config.mode == "local":
                answer = await asyncio.wrap_future(worker.submit(lambda: _generate(checked, chat.max_tokens)))
                decision, text = answer.decision, answer.response
                # The guard's own timing of its check (prefix and framings), not of the answer after it.
                check_seconds = answer.seconds.get("prefix", 0.0) + answer.seconds.get("check", 0.0)
            else:
                decision = await asyncio.wrap_future(worker.check(checked))
                text = guard.config.refusal_message
                check_seconds = time.perf_counter() - started  # from arrival: parsing, queueing and the batch
        except REQUEST_LIMIT_ERRORS as exc:
            if isinstance(exc, RequestTimedOut):
                metrics.requests.labels("limit").inc()
                return _Served(None, _error_response(504, str(exc), "timeout_error", None, "request_timeout"))
            raise BadRequest(f"{where}: {exc}", where, "request_too_large") from None
        metrics.check_latency.observe(check_seconds)
        record = _decision(decision, turn, check_seconds)
        headers = {DECISION_HEADER: json.dumps(record)}
        if decision.error is not None:
            metrics.check_errors.inc()
        if decision.refused:
            metrics.refusals.inc()
            metrics.requests.labels("refused").inc()
        if config.mode == "upstream" and not decision.refused:
            assert upstream is not None
            response = await upstream.forward(raw, request.headers, headers)
            ok = response.status_code < 400
            metrics.requests.labels("answered" if ok else "upstream_error").inc()
            return _Served(decision, response)
        if not decision.refused:
            metrics.requests.labels("answered").inc()
        model = chat.model or model_name if config.mode == "upstream" else model_name
        answer_id = completion_id()
        if chat.stream:
            events = chunks(text, model, record, answer_id)
            return _Served(decision, StreamingResponse(_aiter(events), media_type="text/event-stream", headers=headers))
        return _Served(decision, JSONResponse(completion(text, model, record, answer_id), headers=headers))

    def _generate(checked: Request, max_tokens: int | None) -> GuardedResponse:
        """The local answer, on the model thread, under the run's request timeout."""
        with guard.time_limit():
            return guard.generate(checked.image, checked.text, max_tokens)

    async def _image_path(turn: CheckedTurn, folder: Path) -> Path | None:
        if turn.image is None:
            return None
        if turn.image.url.lower().startswith("data:"):
            data = data_uri_bytes(turn.image)
        else:
            data = await fetch_image(turn.image, images, config.max_body_bytes)
        return await anyio.to_thread.run_sync(checked_image_file, data, turn.image, folder, guard.limits)

    def _decision(decision: GuardDecision, turn: CheckedTurn, check_seconds: float) -> dict[str, Any]:
        return {
            **decision_record(decision),
            "detector": guard.detector.describe(),
            "check": config.check,
            "checked_messages": list(turn.messages),
            "check_seconds": round(check_seconds, 6),
        }

    return app


def _text_field(chat: ChatRequest, turn: CheckedTurn) -> str:
    """The field a limit error on the checked text names: the one message's content, or all messages."""
    if len(turn.messages) == 1:
        return f"{chat.messages[turn.messages[0]].where}.content"
    return "messages"


async def _read_body(request: HTTPRequest, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    data = bytearray()
    async for chunk in request.stream():
        data.extend(chunk)
        if len(data) > limit:
            raise _too_large(len(data), limit)
    return bytes(data)


def _too_large(size: int, limit: int) -> BadRequest:
    return BadRequest(
        f"the request body is {size:,} bytes or more, over the limit of {limit:,} (--max-body-bytes)",
        None,
        "body_too_large",
        status=413,
    )


def _error_response(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


async def _aiter(events: Any) -> AsyncIterator[str]:
    for event in events:
        yield event


def decision_from_headers(headers: Mapping[str, str]) -> dict[str, Any] | None:
    """The guard's decision from a response's headers (clients and tests), or None when there is none."""
    value = headers.get(DECISION_HEADER)
    return None if value is None else json.loads(value)
