"""Where the tests find the project and the development benchmarks beside it."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_BENCHMARKS = PROJECT_ROOT.parent / "shared" / "benchmarks"
