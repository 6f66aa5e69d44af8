"""A Chat Completions request body, validated, and the turn of it the guard checks.

Only what the proxy needs is read: ``messages`` (roles, text parts, ``image_url`` parts),
``stream``, ``n`` and ``max_tokens`` / ``max_completion_tokens``. Everything else is left to the
model server in upstream mode, which receives the body unchanged. Every problem raises
:class:`BadRequest` naming the field (``messages[3].content[1]``), in OpenAI's error shape.

Which text the guard checks (``--check``):

- ``last-user`` (default): the last user turn's text, with its image. That is the request the
  model is about to answer, and the probe was trained and tau calibrated on single user requests,
  so the score means what the calibration says it means. Earlier turns and the system prompt are
  not checked: a request split over turns, or hidden in an earlier one, can pass.
- ``all-user``: every user turn's text, joined by blank lines (images across them: at most one).
- ``all``: the system (and developer) prompts and every user turn, joined the same way.

Assistant and tool turns are never checked: they are the model's own or tools' output, not the
user's request. The joined policies see split and hidden requests but score a text unlike the
calibration data, and long conversations reach ``limits.max_request_chars`` sooner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.errors import LSIGuardError

CHECK_POLICIES: tuple[str, ...] = ("last-user", "all-user", "all")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
CHECKED_ROLES = {"last-user": ("user",), "all-user": ("user",), "all": ("system", "developer", "user")}
TURN_SEPARATOR = "\n\n"


class BadRequest(LSIGuardError, ValueError):
    """A request the proxy refuses with a 4xx; ``param`` names the field, ``code`` the kind of problem."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ImagePart:
    """An ``image_url`` part: its URL (``data:`` or http(s)) and where it sits in the request."""

    url: str
    where: str


@dataclass(frozen=True, kw_only=True)
class Message:
    """One message: its role, the text of its text parts (joined by newlines), and its images."""

    role: str
    text: str
    images: tuple[ImagePart, ...]
    where: str


@dataclass(frozen=True)
class CheckedTurn:
    """What the guard checks: the text, at most one image, and which messages they came from."""

    text: str
    image: ImagePart | None
    messages: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class ChatRequest:
    """The fields of a Chat Completions body the proxy reads, and the body itself."""

    body: dict[str, Any]
    messages: tuple[Message, ...]
    stream: bool
    model: str | None
    max_tokens: int | None
    include_usage: bool = False  # stream_options.include_usage: a last chunk carries the usage


def parse_body(raw: bytes, max_messages: int, allow_image_urls: bool) -> ChatRequest:
    """A Chat Completions request from the raw body; :class:`BadRequest` names what is wrong."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_kind(body)}", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"model must be a string, got {_kind(model)}", "model", "invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {_kind(stream)}", "stream", "invalid_type")
    include_usage = _include_usage(body.get("stream_options"), stream)
    n = body.get("n")
    if n is not None and (not _whole(n) or n < 1):
        raise BadRequest(f"n must be a whole number >= 1, got {n!r}", "n", "invalid_value")
    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not _whole(value) or value < 1:
            raise BadRequest(f"{key} must be a whole number >= 1, got {value!r}", key, "invalid_value")
        max_tokens = max_tokens or value
    messages = parse_messages(body.get("messages"), max_messages, allow_image_urls)
    return ChatRequest(
        body=body, messages=messages, stream=stream, model=model, max_tokens=max_tokens, include_usage=include_usage
    )


def _include_usage(options: Any, stream: bool) -> bool:
    """``stream_options.include_usage``, checked: an object, only with ``stream: true``, a boolean inside."""
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest(f"stream_options must be an object, got {_kind(options)}", "stream_options", "invalid_type")
    if not stream:
        raise BadRequest("stream_options is only allowed with stream: true", "stream_options", "invalid_value")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise BadRequest(
            f"stream_options.include_usage must be true or false, got {_kind(value)}",
            "stream_options.include_usage",
            "invalid_type",
        )
    return value


def parse_messages(value: object, max_messages: int, allow_image_urls: bool) -> tuple[Message, ...]:
    """Every message, validated: a role, text or text and ``image_url`` parts, within ``max_messages``."""
    if value is None:
        raise BadRequest("messages is missing: give the conversation as a list of messages", "messages", "missing")
    if not isinstance(value, list):
        raise BadRequest(f"messages must be a list, got {_kind(value)}", "messages", "invalid_type")
    if not value:
        raise BadRequest("messages is empty: give at least one user message", "messages", "invalid_value")
    if len(value) > max_messages:
        raise BadRequest(
            f"messages has {len(value):,} messages, over the limit of {max_messages:,} (--max-messages)",
            "messages",
            "too_many_messages",
        )
    return tuple(_message(item, f"messages[{index}]", allow_image_urls) for index, item in enumerate(value))


def _message(item: object, where: str, allow_image_urls: bool) -> Message:
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object, got {_kind(item)}", where, "invalid_type")
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
    content = item.get("content")
    if content is None and role in ("assistant", "tool", "function"):
        return Message(role=role, text="", images=(), where=where)  # an assistant turn made only of tool calls
    if isinstance(content, str):
        _check_text(content, f"{where}.content", role)
        return Message(role=role, text=content, images=(), where=where)
    if not isinstance(content, list):
        raise BadRequest(
            f"{where}.content must be a string or a list of parts, got {_kind(content)}",
            f"{where}.content",
            "invalid_type",
        )
    if not content:
        raise BadRequest(f"{where}.content is an empty list", f"{where}.content", "empty_content")
    texts: list[str] = []
    images: list[ImagePart] = []
    for index, part in enumerate(content):
        part_where = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict):
            raise BadRequest(f"{part_where} must be an object, got {_kind(part)}", part_where, "invalid_type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"{part_where}.text must be a string, got {_kind(text)}", f"{part_where}.text")
            _check_text(text, f"{part_where}.text", role)
            texts.append(text)
        elif kind == "image_url" and role == "user":
            images.append(_image_part(part, part_where, allow_image_urls))
        else:
            allowed = "text and image_url" if role == "user" else "text"
            raise BadRequest(
                f"{part_where}: unsupported content part type {kind!r} in a {role} message (supported: {allowed})",
                part_where,
                "unsupported_content",
            )
    return Message(role=role, text="\n".join(texts), images=tuple(images), where=where)


def _check_text(text: str, where: str, role: str) -> None:
    """A user or system text must say something; an empty one is refused rather than checked as nothing."""
    if role in ("user", "system", "developer") and not text.strip():
        raise BadRequest(f"{where} is empty", where, "empty_text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        raise BadRequest(f"{where} holds a lone surrogate {bad!r}, which is not text", where, "invalid_text") from None


def _image_part(part: dict[str, Any], where: str, allow_image_urls: bool) -> ImagePart:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}.image_url.url must be a non-empty string", f"{where}.image_url.url", "invalid_type")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return ImagePart(url, where)
    if scheme in ("http", "https"):
        if not allow_image_urls:
            raise BadRequest(
                f"{where}: image URLs are off on this server (start it with --allow-image-urls); "
                "send the image inline as a data: URI",
                where,
                "image_url_disabled",
            )
        return ImagePart(url, where)
    raise BadRequest(
        f"{where}.image_url.url must be a data: URI or an http(s) URL, got scheme {scheme or 'none'!r}",
        f"{where}.image_url.url",
        "invalid_image_url",
    )


def checked_turn(messages: tuple[Message, ...], policy: str) -> CheckedTurn:
    """The text and image the guard checks under ``policy`` (see the module docstring)."""
    if policy not in CHECK_POLICIES:
        raise ValueError(f"unknown check policy {policy!r}; choose one of {', '.join(CHECK_POLICIES)}")
    users = [index for index, message in enumerate(messages) if message.role == "user"]
    if not users:
        raise BadRequest("messages has no user message for the guard to check", "messages", "no_user_message")
    if policy == "last-user":
        chosen = [users[-1]]
    else:
        chosen = [index for index, message in enumerate(messages) if message.role in CHECKED_ROLES[policy]]
    texts = [messages[index].text for index in chosen if messages[index].text]
    images = [image for index in chosen for image in messages[index].images]
    if len(images) > 1:
        places = ", ".join(image.where for image in images)
        raise BadRequest(
            f"the guard checks one image per request; the checked turns ({policy}) have {len(images)}: {places}",
            images[1].where,
            "too_many_images",
        )
    if not texts:
        where = messages[chosen[-1]].where
        raise BadRequest(
            f"{where}.content has no text: the guard checks a request's text (with its image)",
            f"{where}.content",
            "empty_text",
        )
    return CheckedTurn(TURN_SEPARATOR.join(texts), images[0] if images else None, tuple(chosen))


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    """A JSON type name for messages about wrong types."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if type(value) is kind:
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__
