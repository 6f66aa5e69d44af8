"""``python -m lsi_guard_app``: the same command line as ``lsi-guard``."""

from __future__ import annotations

import sys

from lsi_guard_app.cli import main

if __name__ == "__main__":
    sys.exit(main())
