"""The DVC stages, one leaf module each (``python -m stages.<name>``), and the runner they share.

:func:`run_stage` is the edge where an expected failure becomes one line: every error the library
expects subclasses :class:`pipeline.errors.LSIGuardError`; anything else is a bug and keeps its
traceback. :func:`run_record` is the ``run`` record each stage adds to its metrics file.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from pipeline.errors import LSIGuardError
from pipeline.run_record import build_run_record

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# When the stage started: reset by run_stage; the import time for a stage's code called otherwise (tests, the CLI).
_started = time.monotonic()


def run_record(model_name: str, model_revision: str, device: str) -> dict[str, Any]:
    """The ``run`` record of this stage (:func:`pipeline.run_record.build_run_record`), timed from its start.

    ``device`` is where the stage's torch work ran: the model's resolved device, or ``cpu`` for
    the stages that read only the activation store.
    """
    return build_run_record(
        model_name=model_name,
        model_revision=model_revision,
        device=device,
        wall_time_s=time.monotonic() - _started,
    )


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` with logging set up; an expected failure prints ``error: ...`` and exits 1.

    Progress goes to the log (stderr); a stage's final summary is its only standard output.
    """
    global _started
    _started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    try:
        main()
    # FileNotFoundError too: params.yaml names user-given paths (sources, model folders) that the
    # libraries below open directly, and the OS error already names the missing file.
    except (LSIGuardError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
