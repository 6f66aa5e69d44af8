"""LSI-Guard: latent safety injection and ECSO defences for vision-language models.

The public API, one import away::

    from pipeline import Guard, load_params, make_request

    guard = Guard.from_run(".")
    decision = guard.check("photo.png", "What does the sign say?")

Each name is loaded the first time it is asked for, so ``import pipeline.config`` (what the
pipeline's cheap stages do) never pulls in torch or the model code. The library's own modules
import from their deep paths; this package is for the people who use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.version import __version__

# Public name -> the module that defines it. The TYPE_CHECKING imports below name the same
# objects for type checkers; tests/test_architecture.py checks that they, ``_PUBLIC`` and ``__all__`` agree.
_PUBLIC: dict[str, str] = {
    # guarding requests
    "Guard": "pipeline.defend.guard",
    "GuardDecision": "pipeline.defend.decisions",
    "GuardedResponse": "pipeline.defend.decisions",
    "GuardLoadError": "pipeline.defend.loading",
    "make_request": "pipeline.defend.admission",
    "REQUEST_LIMIT_ERRORS": "pipeline.defend.admission",
    "ECSO": "pipeline.defend.ecso",
    # configuration
    "Params": "pipeline.config",
    "load_params": "pipeline.config",
    "ContrastivePrompts": "pipeline.config",
    # models
    "Request": "pipeline.models.base",
    "ModelAdapter": "pipeline.models.base",
    "load_adapter": "pipeline.models.registry",
    # activation stores and detectors
    "ActivationStore": "pipeline.detect.store",
    "Provenance": "pipeline.detect.store_schema",
    "open_store": "pipeline.detect.provenance",
    "LSIDetector": "pipeline.detect.detector",
    "LinearDetector": "pipeline.detect.detector",
    "load_detector": "pipeline.detect.shipped",
    "Calibration": "pipeline.detect.calibration",
    # errors
    "LSIGuardError": "pipeline.errors",
}

__all__ = [
    "__version__",
    "Guard",
    "GuardDecision",
    "GuardedResponse",
    "GuardLoadError",
    "make_request",
    "REQUEST_LIMIT_ERRORS",
    "ECSO",
    "Params",
    "load_params",
    "ContrastivePrompts",
    "Request",
    "ModelAdapter",
    "load_adapter",
    "ActivationStore",
    "Provenance",
    "open_store",
    "LSIDetector",
    "LinearDetector",
    "load_detector",
    "Calibration",
    "LSIGuardError",
]

if TYPE_CHECKING:
    from pipeline.config import ContrastivePrompts, Params, load_params
    from pipeline.defend.admission import REQUEST_LIMIT_ERRORS, make_request
    from pipeline.defend.decisions import GuardDecision, GuardedResponse
    from pipeline.defend.ecso import ECSO
    from pipeline.defend.guard import Guard
    from pipeline.defend.loading import GuardLoadError
    from pipeline.detect.calibration import Calibration
    from pipeline.detect.detector import LinearDetector, LSIDetector
    from pipeline.detect.provenance import open_store
    from pipeline.detect.shipped import load_detector
    from pipeline.detect.store import ActivationStore
    from pipeline.detect.store_schema import Provenance
    from pipeline.errors import LSIGuardError
    from pipeline.models.base import ModelAdapter, Request
    from pipeline.models.registry import load_adapter


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562), then keep it here."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
