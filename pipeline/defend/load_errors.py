"""The error every failure to load a guard raises, in a module of its own.

Kept apart from :mod:`pipeline.defend.loading` (which brings torch and the detectors) so that
light callers, such as the command line checking a saved guard's limits before the model loads,
can name it without those seconds of import.
"""

from __future__ import annotations

from pipeline.errors import LSIGuardError


class GuardLoadError(LSIGuardError, RuntimeError):
    """A run folder or saved guard that lacks what the guard needs (params, trained probe, calibration, model)."""
