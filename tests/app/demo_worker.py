"""Serve the demo for a test run whose model is the tests' fake adapter: ``python -m tests.app.demo_worker RUN PORT``.

The process is the real ``python -m lsi_guard_app.web`` command line; only the model loader is
replaced, so a test can start it, signal it and look at what it leaves behind.
"""

from __future__ import annotations

import sys

import pipeline.defend.loading
from lsi_guard_app.web.app import main
from tests.defend.test_guard import FakeAdapter

if __name__ == "__main__":
    pipeline.defend.loading.load_adapter = lambda config, *_: FakeAdapter()  # type: ignore[assignment]
    sys.exit(main(["--run", sys.argv[1], "--port", sys.argv[2]]))
