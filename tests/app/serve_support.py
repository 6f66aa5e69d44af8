"""What the proxy's tests share: servers on loopback ports, a fake upstream model server, request bodies."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pipeline.data.drawing import render_typography
from pipeline.images import png_bytes

FAIL_MARK = "please-fail-upstream"
STARTUP_S = 60.0


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    ends = time.monotonic() + STARTUP_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > ends:
            raise RuntimeError(f"the test server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(STARTUP_S)
        sock.close()


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message of a chat body (string content or text parts)."""
    content = [m for m in body["messages"] if m.get("role") == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part.get("type") == "text")


@dataclass
class FakeUpstream:
    """A tiny OpenAI-compatible server that echoes the last user text; records what it received."""

    received: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            raw = await request.body()
            body = json.loads(raw)
            with self.lock:
                self.received.append({"raw": raw, "body": body, "authorization": request.headers.get("authorization")})
            text = "echo: " + last_user_text(body)
            if FAIL_MARK in text:
                error = {"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": "busy"}}
                return JSONResponse(error, status_code=429)
            if body.get("stream"):
                return StreamingResponse(echo_events(text), media_type="text/event-stream")
            return JSONResponse(echo_completion(text))

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "t"}]}

        @app.get("/picture.png")
        async def picture() -> Response:
            return Response(png_bytes(render_typography("hello")), media_type="image/png")

        @app.get("/missing.png")
        async def missing() -> Response:
            return Response(b"no", status_code=404)

        return app


def echo_completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


async def echo_events(text: str) -> Any:
    for piece in (text[: len(text) // 2], text[len(text) // 2 :]):
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake-model",
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
        }
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, url: str) -> dict[str, Any]:
    """A user message with a text part and an image part."""
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
    }


def file_uri(path: Path) -> str:
    return data_uri(path.read_bytes())
