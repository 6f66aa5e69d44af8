"""Forwarding a checked request to an OpenAI-compatible model server, and passing its answer back.

The body goes on byte for byte as the client sent it. Authorization is the configured key when
there is one (read from an environment variable at start-up, never from the command line), else
the client's own header, unless the proxy has a key of its own (then the client's header is the
proxy's key and is never sent on). The upstream's status and body come back unchanged (errors included), and
a streamed answer's SSE bytes are passed through as they arrive. An upstream that cannot be reached
is a 502, one that does not answer within the timeout a 504, both in OpenAI's error shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import httpx
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from lsi_guard_app.serve.schema import error_body

# Request headers passed on to the upstream besides Authorization (hop-by-hop ones are not).
FORWARDED_HEADERS = ("content-type", "accept", "openai-organization", "openai-project", "user-agent")
# Response headers passed back besides the body's content type.
RETURNED_HEADERS = ("content-type", "x-request-id", "openai-processing-ms", "retry-after")


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    """Where to forward and how: the base URL (``http://host:8000/v1``), an optional key, the timeout."""

    url: str
    api_key: str | None = None
    timeout_s: float = 300.0
    pass_client_key: bool = True  # send the client's Authorization when there is no api_key


class Upstream:
    """An HTTP client for one upstream server; :meth:`forward` sends a checked chat completion request."""

    def __init__(self, config: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.endpoint = config.url.rstrip("/") + "/chat/completions"
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            transport=transport,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    def headers(self, incoming: Mapping[str, str]) -> dict[str, str]:
        """The headers to send upstream: the pass-through ones and the Authorization to use."""
        headers = {name: incoming[name] for name in FORWARDED_HEADERS if name in incoming}
        headers.setdefault("content-type", "application/json")
        if self.config.api_key is not None:
            headers["authorization"] = f"Bearer {self.config.api_key}"
        elif self.config.pass_client_key and "authorization" in incoming:
            headers["authorization"] = incoming["authorization"]
        return headers

    async def models(self, incoming: Mapping[str, str]) -> Response:
        """The upstream's ``GET /models`` answer, status and body unchanged."""
        url = self.config.url.rstrip("/") + "/models"
        try:
            response = await self.client.get(url, headers=self.headers(incoming))
        except httpx.TimeoutException as exc:
            return _error(504, f"the upstream {url} did not answer in time ({exc!r})", "upstream_timeout", {})
        except httpx.HTTPError as exc:
            return _error(
                502, f"cannot reach the upstream {url} ({type(exc).__name__}: {exc})", "upstream_unreachable", {}
            )
        headers = {name: response.headers[name] for name in RETURNED_HEADERS if name in response.headers}
        return Response(response.content, status_code=response.status_code, headers=headers)

    async def forward(self, body: bytes, incoming: Mapping[str, str], extra_headers: Mapping[str, str]) -> Response:
        """Send ``body`` upstream; its answer (streamed through when it is an event stream) with ``extra_headers``."""
        request = self.client.build_request("POST", self.endpoint, content=body, headers=self.headers(incoming))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            message = f"the upstream {self.endpoint} did not answer within {self.config.timeout_s:g} s ({exc!r})"
            return _error(504, message, "upstream_timeout", extra_headers)
        except httpx.HTTPError as exc:
            message = f"cannot reach the upstream {self.endpoint} ({type(exc).__name__}: {exc})"
            return _error(502, message, "upstream_unreachable", extra_headers)
        headers = {name: response.headers[name] for name in RETURNED_HEADERS if name in response.headers}
        headers.update(extra_headers)
        media = response.headers.get("content-type", "")
        if response.status_code == 200 and media.startswith("text/event-stream"):
            return StreamingResponse(
                _passthrough(response), status_code=200, headers=headers, background=BackgroundTask(response.aclose)
            )
        try:
            content = await response.aread()
        except httpx.HTTPError as exc:
            message = f"the upstream {self.endpoint} broke off its answer ({type(exc).__name__}: {exc})"
            return _error(502, message, "upstream_broken", extra_headers)
        finally:
            await response.aclose()
        return Response(content, status_code=response.status_code, headers=headers)


async def _passthrough(response: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream's SSE bytes as they arrive; a connection lost midway ends the stream."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError:
        return  # the client sees the stream end without [DONE], as it would from the upstream itself


def _error(status: int, message: str, code: str, headers: Mapping[str, str]) -> JSONResponse:
    return JSONResponse(error_body(message, "upstream_error", None, code), status_code=status, headers=dict(headers))
