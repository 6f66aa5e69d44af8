"""``lsi-guard serve``: its options, their checks, and serving until Ctrl+C.

Only argparse and the option names load with the CLI's parser; the guard, FastAPI and uvicorn are
imported once the options have passed their checks, so a bad flag exits 2 at once, naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from lsi_guard_app.serve.schema import CHECK_POLICIES
from lsi_guard_app.sources import GuardSource, guard_source, load_guard
from pipeline.errors import LSIGuardError
from pipeline.extras import require

DEFAULT_PORT = 8080
# pipeline.defend.batching's defaults, repeated so that building the parser does not import the guard.
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_S = 0.020
DEFAULT_UPSTREAM_TIMEOUT_S = 300.0
DEFAULT_PREFIX_CACHE_TOKENS = 4096  # pipeline.models.prefix_cache.DEFAULT_MAX_TOKENS

# What the server imports from the 'serve' extra, checked before the guard's seconds of loading.
SERVE_MODULES = ("fastapi", "uvicorn", "httpx", "prometheus_client")

logger = logging.getLogger(__name__)


class ServeOptionError(LSIGuardError, ValueError):
    """An ``lsi-guard serve`` option that cannot work; the message names the option."""


def add_serve_arguments(sub: argparse.ArgumentParser) -> None:
    """The ``serve`` options (the shared ``--run``/``--guard``/``--policy``/... are added by the CLI)."""
    sub.add_argument("--mode", choices=("local", "upstream"), default="local", help="who answers (default: local)")
    sub.add_argument("--upstream", help="upstream mode: the OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    sub.add_argument(
        "--upstream-key-env",
        metavar="NAME",
        help="send the key in environment variable NAME to the upstream (default: pass the client's Authorization)",
    )
    sub.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="clients must send the key in environment variable NAME as a bearer token on /v1 routes "
        "(default: no key; /health and /metrics stay open)",
    )
    sub.add_argument(
        "--upstream-timeout-s", type=float, default=DEFAULT_UPSTREAM_TIMEOUT_S, help="upstream timeout (default: 300)"
    )
    sub.add_argument(
        "--check", choices=CHECK_POLICIES, default="last-user", help="which turns the guard checks (default: last-user)"
    )
    sub.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="checks per micro-batch (default: 16; 1 = one at a time)",
    )
    sub.add_argument(
        "--max-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_S * 1000,
        help="how long a micro-batch waits for more checks after its first (default: 20)",
    )
    sub.add_argument(
        "--max-body-bytes", type=int, default=20 * 1024 * 1024, help="request body limit (default: 20 MiB)"
    )
    sub.add_argument("--max-messages", type=int, default=256, help="messages per request (default: 256)")
    sub.add_argument(
        "--allow-image-urls", action="store_true", help="fetch http(s) image URLs (default: data URIs only)"
    )
    sub.add_argument("--image-url-timeout-s", type=float, default=10.0, help="image URL fetch timeout (default: 10)")
    sub.add_argument(
        "--max-new-tokens", type=int, help="local mode: default answer length (default: guard.max_new_tokens)"
    )
    sub.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=DEFAULT_PREFIX_CACHE_TOKENS,
        help="tokens of shared prompt starts whose keys and values are kept and reused across requests "
        f"(default: {DEFAULT_PREFIX_CACHE_TOKENS}; 0 turns reuse off)",
    )
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    sub.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")


@dataclass(frozen=True)
class ServeKeys:
    """Keys read from the environment: the upstream's (``--upstream-key-env``) and the proxy's (``--api-key-env``)."""

    upstream: str | None = None
    inbound: str | None = None
    # The guard the options name (--run or --guard), resolved once: a Hub id is fetched only here.
    source: GuardSource | None = None


def check_options(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServeKeys:
    """Raise :class:`ServeOptionError` naming the first bad option; else the keys the options name."""
    environ = dict(os.environ) if environ is None else environ
    if args.mode == "upstream":
        if not args.upstream:
            raise ServeOptionError("--mode upstream needs --upstream URL (the model server's base URL, ending in /v1)")
        if not args.upstream.startswith(("http://", "https://")):
            raise ServeOptionError(f"--upstream must be an http:// or https:// URL, got {args.upstream!r}")
    elif args.upstream or args.upstream_key_env:
        flag = "--upstream" if args.upstream else "--upstream-key-env"
        raise ServeOptionError(f"{flag} is for --mode upstream; local mode answers with the guard's own model")
    for flag, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--max-body-bytes", args.max_body_bytes, 1),
        ("--max-messages", args.max_messages, 1),
        ("--port", args.port, 0),
    ):
        if value < low:
            raise ServeOptionError(f"{flag} must be >= {low}, got {value}")
    if not args.max_wait_ms >= 0:
        raise ServeOptionError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    for flag, seconds in (
        ("--upstream-timeout-s", args.upstream_timeout_s),
        ("--image-url-timeout-s", args.image_url_timeout_s),
    ):
        if not seconds > 0:
            raise ServeOptionError(f"{flag} must be > 0 seconds, got {seconds}")
    if args.prefix_cache_tokens != 0 and args.prefix_cache_tokens < 2:
        raise ServeOptionError(f"--prefix-cache-tokens must be 0 (off) or >= 2, got {args.prefix_cache_tokens}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ServeOptionError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    source = guard_source(args.run, args.guard, args.model)
    policy = args.policy or source.policy
    if args.mode == "upstream" and policy != "lsi":
        raise ServeOptionError(
            f"--mode upstream needs the lsi policy, not {policy!r} (--policy or guard.policy): ECSO runs the "
            "guard's own model, which does not answer in upstream mode"
        )
    return ServeKeys(
        upstream=_key_from(environ, "--upstream-key-env", args.upstream_key_env),
        inbound=_key_from(environ, "--api-key-env", args.api_key_env),
        source=source,
    )


def _key_from(environ: dict[str, str], flag: str, name: str | None) -> str | None:
    """The key in environment variable ``name`` (None when the flag is not given); unset or empty is an error."""
    if name is None:
        return None
    key = environ.get(name)
    if not key:
        raise ServeOptionError(f"{flag} {name}: that environment variable is not set")
    return key


def serve_command(args: argparse.Namespace) -> int:
    """Check the options, load the guard (--run or --guard) and serve until interrupted; 2 on a bad option or guard."""
    try:
        keys = check_options(args)
        for module in SERVE_MODULES:
            require(module, "serve", "lsi-guard serve")
        # Imported only now: the guard (torch, the model code), FastAPI and uvicorn take seconds.
        import uvicorn

        from lsi_guard_app.serve.app import ServeConfig, build_app
        from lsi_guard_app.serve.upstream import UpstreamConfig

        upstream = None
        if args.mode == "upstream":
            upstream = UpstreamConfig(url=args.upstream, api_key=keys.upstream, timeout_s=args.upstream_timeout_s)
        config = ServeConfig(
            mode=args.mode,
            check=args.check,
            upstream=upstream,
            max_batch=args.max_batch,
            max_wait_s=args.max_wait_ms / 1000,
            max_body_bytes=args.max_body_bytes,
            max_messages=args.max_messages,
            allow_image_urls=args.allow_image_urls,
            image_timeout_s=args.image_url_timeout_s,
            api_key=keys.inbound,
        )
        source = keys.source if keys.source is not None else guard_source(args.run, args.guard, args.model)
        guard = load_guard(
            source,
            policy=args.policy,
            on_error=args.on_error,
            ecso_margin=args.ecso_margin,
            max_new_tokens=args.max_new_tokens,
        )
    except LSIGuardError as exc:
        print(f"lsi-guard: error: {exc}", file=sys.stderr)
        return 2
    from pipeline.models.prefix_cache import set_prefix_reuse

    set_prefix_reuse(guard.adapter, args.prefix_cache_tokens > 0, max(args.prefix_cache_tokens, 2))
    app = build_app(guard, config)
    print(
        f"lsi-guard serve: {args.mode} mode on http://{args.host}:{args.port}/v1 "
        f"(check {args.check}, policy {guard.config.policy}, model {guard.adapter.info.name}"
        + (f", upstream {args.upstream}" if upstream else "")
        + (f", clients need the key in ${args.api_key_env}" if keys.inbound else "")
        + ("" if args.prefix_cache_tokens else ", prefix reuse off")
        + "); Ctrl+C stops it",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
