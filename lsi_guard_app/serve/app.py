"""The proxy's HTTP app: OpenAI Chat Completions in front of a guard, in local or upstream mode.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

One request: the body is read (at most ``max_body_bytes``), parsed and validated
(:mod:`~lsi_guard_app.serve.schema`), the checked turn's image is decoded and checked against the
run's limits (:mod:`~lsi_guard_app.serve.images`), and the text against ``limits.max_request_chars``;
any problem is a 4xx in OpenAI's error shape naming the field. Then, on the model thread
(:class:`~pipeline.defend.batching.ModelWorker`):

- ``local``: :meth:`Guard.generate_stream` answers (or refuses) with the guard's own model, the
  answer continuing from the check's cached prefix, under ``limits.request_timeout_s``. The model
  answers the checked text as one user turn (the guard is single-turn: earlier assistant turns are
  not replayed). ``stream: true`` sends each token's text as the model decodes it; a client that
  disconnects stops the decoding before its next token, which frees the model thread.
- ``upstream``: the check is scored in a micro-batch with the other waiting checks; a request that
  passes is forwarded unchanged (:mod:`~lsi_guard_app.serve.upstream`).

A refusal is an ordinary chat completion whose message is ``guard.refusal_message``. Every answer
the guard decided carries the decision as JSON in the ``X-LSI-Guard-Decision`` header; answers the
proxy writes itself (refusals, local answers) also carry it in an ``lsi_guard`` body field, with
``usage`` and ``finish_reason`` as OpenAI gives them (``stream_options.include_usage`` adds the
usage chunk to a stream).

With ``ServeConfig.api_key`` (``--api-key-env``), every ``/v1`` route wants
``Authorization: Bearer <key>`` and answers 401 in OpenAI's error shape without it; ``/health`` and
``/metrics`` stay open, as vLLM's ``--api-key`` leaves them. The client's key is then the proxy's,
so it is never passed on upstream: the upstream gets ``--upstream-key-env``'s key or none.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import FastAPI
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from lsi_guard_app.serve.completions import DECISION_HEADER, DONE, ChunkStream, chunks, completion, completion_id
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
from pipeline.defend.streaming import GuardedStream
from pipeline.defend.usage import TokenUsage, refusal_usage
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
    api_key: str | None = None  # clients must send it as a bearer token on /v1 routes (None: open)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "upstream" and self.upstream is None:
            raise ValueError("upstream mode needs an upstream URL (--upstream)")
        for name in ("max_body_bytes", "max_messages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (None leaves the proxy open)")


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
    metrics.watch(worker)
    upstream_config = config.upstream
    if upstream_config is not None and config.api_key is not None:
        # The client's Authorization carries the proxy's own key: never send it on.
        upstream_config = replace(upstream_config, pass_client_key=False)
    upstream = None if upstream_config is None else Upstream(upstream_config, upstream_transport)
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

    expected_auth = None if config.api_key is None else f"Bearer {config.api_key}".encode()

    def unauthorized(request: HTTPRequest) -> Response | None:
        """A 401 for a /v1 request without the proxy's key (None when it has it, or the proxy has none)."""
        if expected_auth is None:
            return None
        if hmac.compare_digest(request.headers.get("authorization", "").encode(), expected_auth):
            return None
        metrics.requests.labels("unauthorized").inc()
        message = "a missing or wrong API key: send Authorization: Bearer <key> (the key --api-key-env names)"
        return _error_response(401, message, "invalid_request_error", None, "invalid_api_key")

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
        if (refused := unauthorized(request)) is not None:
            return refused
        if upstream is not None:
            return await upstream.models(request.headers)
        entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "lsi-guard"}
        return JSONResponse({"object": "list", "data": [entry]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        started = time.perf_counter()
        folder = Path(tempfile.mkdtemp(dir=work))
        handed_over: set[Path] = set()  # a streamed answer's folder, removed by the model thread once it ends
        try:
            served = await _serve(request, folder, started, handed_over)
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
            if folder not in handed_over:
                await asyncio.to_thread(shutil.rmtree, folder, True)
        metrics.latency.observe(time.perf_counter() - started)
        return served.response

    async def _serve(request: HTTPRequest, folder: Path, started: float, handed_over: set[Path]) -> _Served:
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
        if config.mode == "local" and chat.stream:
            return await _stream_local(chat, checked, turn, where, folder, handed_over)
        usage: TokenUsage | None = None
        finish_reason = "stop"
        try:
            if config.mode == "local":
                answer = await asyncio.wrap_future(worker.submit(lambda: _generate(checked, chat.max_tokens)))
                decision, text = answer.decision, answer.response
                usage, finish_reason = answer.usage, answer.finish_reason
                # The guard's own timing of its check (prefix and framings), not of the answer after it.
                check_seconds = answer.seconds.get("prefix", 0.0) + answer.seconds.get("check", 0.0)
            else:
                decision = await asyncio.wrap_future(worker.check(checked))
                text = guard.config.refusal_message
                check_seconds = time.perf_counter() - started  # from arrival: parsing, queueing and the batch
        except REQUEST_LIMIT_ERRORS as exc:
            return _limit_response(exc, where)
        metrics.check_latency.observe(check_seconds)
        record = _decision(decision, turn, check_seconds)
        headers = {DECISION_HEADER: json.dumps(record)}
        _count(decision)
        if config.mode == "upstream" and not decision.refused:
            assert upstream is not None
            response = await upstream.forward(raw, request.headers, headers)
            ok = response.status_code < 400
            metrics.requests.labels("answered" if ok else "upstream_error").inc()
            return _Served(decision, response)
        if not decision.refused:
            metrics.requests.labels("answered").inc()
        if config.mode == "upstream":
            # A refusal the proxy writes: its usage counts the checked turn under the guard's model
            # (tokenising an image is model-thread work, so it queues there).
            usage = await asyncio.wrap_future(
                worker.submit(lambda: refusal_usage(guard.adapter, checked, guard.config.refusal_message))
            )
        model = chat.model or model_name if config.mode == "upstream" else model_name
        answer_id = completion_id()
        if chat.stream:
            events = chunks(
                text,
                model,
                record,
                answer_id,
                finish_reason=finish_reason,
                usage=usage,
                include_usage=chat.include_usage,
            )
            return _Served(decision, StreamingResponse(_aiter(events), media_type="text/event-stream", headers=headers))
        body = completion(text, model, record, answer_id, finish_reason=finish_reason, usage=usage)
        return _Served(decision, JSONResponse(body, headers=headers))

    def _limit_response(exc: BaseException, where: str) -> _Served:
        """A request limit met on the model thread: 504 past the deadline, else a 400 naming the field."""
        if isinstance(exc, RequestTimedOut):
            metrics.requests.labels("limit").inc()
            return _Served(None, _error_response(504, str(exc), "timeout_error", None, "request_timeout"))
        raise BadRequest(f"{where}: {exc}", where, "request_too_large") from None

    def _count(decision: GuardDecision) -> None:
        if decision.error is not None:
            metrics.check_errors.inc()
        if decision.refused:
            metrics.refusals.inc()
            metrics.requests.labels("refused").inc()

    async def _stream_local(
        chat: ChatRequest, checked: Request, turn: CheckedTurn, where: str, folder: Path, handed_over: set[Path]
    ) -> _Served:
        """Local mode with ``stream: true``: the decision first (headers), then each token's text as it comes.

        The answer may still read the request's image (ECSO, an answer without a session) after
        this returns, so ``folder`` is handed to the model thread, which removes it when done.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()
        decided: Future[GuardedStream] = Future()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))

        def run() -> GuardedResponse:
            """On the model thread: the check, then the answer's pieces handed to the event loop."""
            try:
                return answer()
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        def answer() -> GuardedResponse:
            with guard.time_limit():
                try:
                    stream = guard.generate_stream(checked.image, checked.text, chat.max_tokens, cancel.is_set)
                except BaseException as exc:
                    decided.set_exception(exc)
                    raise
                decided.set_result(stream)
                try:
                    for piece in stream:
                        put("piece", piece)
                except BaseException as exc:
                    put("error", exc)
                    raise
                result = stream.result()
            put("end", result)
            return result

        worker.submit(run)
        handed_over.add(folder)
        try:
            stream = await asyncio.wrap_future(decided)
        except REQUEST_LIMIT_ERRORS as exc:
            return _limit_response(exc, where)
        decision = stream.decision
        seconds = stream_check_seconds(stream)
        metrics.check_latency.observe(seconds)
        record = _decision(decision, turn, seconds)
        _count(decision)
        if not decision.refused:
            metrics.requests.labels("answered").inc()
        writer = ChunkStream(model_name, record, completion_id())

        async def events() -> AsyncIterator[str]:
            try:
                yield writer.start()
                while True:
                    kind, value = await pieces.get()
                    if kind == "piece":
                        yield writer.piece(value)
                        continue
                    if kind == "end":
                        yield writer.finish(value.finish_reason)
                        if chat.include_usage:
                            yield writer.usage(value.usage)
                        yield DONE
                    else:
                        logger.error("a streamed answer failed: %s: %s", type(value).__name__, value)
                        kind_name = "timeout_error" if isinstance(value, RequestTimedOut) else "server_error"
                        yield writer.error(f"the answer failed ({type(value).__name__}: {value})", kind_name, None)
                    return
            finally:
                # A client gone mid-answer: the model thread stops before its next token.
                cancel.set()

        headers = {DECISION_HEADER: json.dumps(record)}
        return _Served(decision, StreamingResponse(events(), media_type="text/event-stream", headers=headers))

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


def stream_check_seconds(stream: GuardedStream) -> float:
    """The guard's own timing of a stream's check (prefix and framings)."""
    seconds = stream.seconds
    return seconds.get("prefix", 0.0) + seconds.get("check", 0.0)


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
