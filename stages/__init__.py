"""The DVC stages, one leaf module each (``python -m stages.<name>``), and the runner they share.

:func:`run_stage` is the edge where an expected failure becomes one line: every error the library
expects subclasses :class:`pipeline.errors.LSIGuardError`; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipeline.errors import LSIGuardError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` with logging set up; an expected failure prints ``error: ...`` and exits 1.

    Progress goes to the log (stderr); a stage's final summary is its only standard output.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    try:
        main()
    # FileNotFoundError too: params.yaml names user-given paths (sources, model folders) that the
    # libraries below open directly, and the OS error already names the missing file.
    except (LSIGuardError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
