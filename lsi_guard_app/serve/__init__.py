"""``lsi-guard serve``: an OpenAI-compatible HTTP proxy that puts the guard in front of a model.

The parts, each with one job: :mod:`~lsi_guard_app.serve.schema` (the request body and which turn
is checked), :mod:`~lsi_guard_app.serve.images` (the checked image, from a data URI or a URL),
:mod:`~lsi_guard_app.serve.completions` (the completions and SSE chunks the proxy writes),
:mod:`~lsi_guard_app.serve.upstream` (forwarding to a model server),
:mod:`~lsi_guard_app.serve.metrics` (Prometheus), :mod:`~lsi_guard_app.serve.app` (the FastAPI
app) and :mod:`~lsi_guard_app.serve.command` (the command line). Micro-batching of checks is the
library's :mod:`pipeline.defend.batching`.

Nothing is imported here, so the CLI's parser loads without FastAPI or the guard.
"""
