"""A fake OpenAI-compatible judge endpoint on 127.0.0.1, for the HTTP judge's tests and its benchmark.

A FastAPI app served by uvicorn in a thread of the calling process. Its handlers are async and
wait ``delay_s`` (``asyncio.sleep``) before answering, as a remote model would, so requests
overlap only when the client sends them concurrently. It counts what a test needs to see: calls
per question (a rerun must ask none twice), requests in flight at once, the bodies and keys
sent; and it answers with injected failures first, in order, when a test queues some.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass(frozen=True)
class Failure:
    """One injected error reply: an HTTP status, its headers (e.g. ``Retry-After``) and an OpenAI-style message."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    message: str = "injected failure"


def question_of(body: dict[str, Any]) -> str:
    """What a request asks, as one string: the raw prompt, or the messages as JSON."""
    if "prompt" in body:
        return str(body["prompt"])
    return json.dumps(body.get("messages", []), ensure_ascii=False, sort_keys=True)


def yes_if_marked(body: dict[str, Any]) -> str:
    """The default reply: "Yes" when the question holds the marker ``[harmful]``, else "No."."""
    return "Yes" if "[harmful]" in question_of(body) else "No."


class FakeJudgeServer:
    """The endpoint; use as a context manager, which starts it and stops it.

    ``url`` is the base URL (``http://127.0.0.1:PORT/v1``). ``reply`` turns a request body into
    the reply text. ``failures`` are answered first, one per request, in order.
    """

    def __init__(self, delay_s: float = 0.2, reply: Callable[[dict[str, Any]], str] = yes_if_marked) -> None:
        self.delay_s = delay_s
        self.reply = reply
        self.failures: list[Failure] = []
        self.calls: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.keys: list[str | None] = []
        self.paths: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def total_calls(self) -> int:
        """Requests received, failures included."""
        return len(self.bodies)

    def app(self) -> FastAPI:
        """The FastAPI app: ``/v1/chat/completions`` and ``/v1/completions``."""
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            return await self._answer(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            return await self._answer(request, chat=False)

        return app

    async def _answer(self, request: Request, chat: bool) -> JSONResponse:
        body = await request.json()
        # Handlers run on the server's one event loop thread, so these counters need no lock.
        self.bodies.append(body)
        self.paths.append(request.url.path)
        self.keys.append(request.headers.get("authorization"))
        self.calls[question_of(body)] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        if self.failures:
            failure = self.failures.pop(0)
            error = {"error": {"message": failure.message, "type": "server_error"}}
            return JSONResponse(error, status_code=failure.status, headers=failure.headers)
        text = self.reply(body)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse(
            {"id": "fake", "object": kind, "created": 0, "model": body.get("model"), "choices": [choice]}
        )

    def start(self) -> None:
        """Serve on a free port of 127.0.0.1 in a daemon thread; return once it accepts connections."""
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the fake judge server on 127.0.0.1:{port} did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}/v1"

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> FakeJudgeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
