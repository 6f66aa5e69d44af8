"""The local web demo: ask the guarded model something in a browser and see what the guard did, and why.

One page: an optional image and a request in, the guard's decision out, in big words, with the
probe's score against tau, the reason, the answer, ECSO's steps when ECSO ran, the time taken and,
on request, the attribution maps. Everything runs on this machine: the server listens on
localhost only, with no share link and no analytics.

``python -m lsi_guard_app.web --run .`` (or ``bash scripts/demo.sh``) serves a finished run;
``--guard DIR`` serves a saved guard instead (``lsi-guard export``), on the model folder it records
or the one ``--model`` names.

The parts: :mod:`~lsi_guard_app.web.render` (what the page shows, as HTML and figures),
:mod:`~lsi_guard_app.web.handling` (one request through the guard) and
:mod:`~lsi_guard_app.web.app` (the gradio page, serving and the command line).
"""

from lsi_guard_app.web.app import build_demo, launch, main, serve

__all__ = ["build_demo", "launch", "main", "serve"]
