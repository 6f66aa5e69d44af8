"""Optional dependencies: the package's extras, imported only where a feature needs them.

The core library (the pipeline, the stages run in this process, ``lsi-guard check`` and
``generate``) imports without any extra. A feature that needs one (``lsi-guard serve``, the web
demo, a Dask cluster, the HTTP judge) asks for it here, so a missing extra is an error that names
the extra and the command installing it, instead of a bare ``ModuleNotFoundError`` from deep
inside the feature.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.machinery import ModuleSpec
from types import ModuleType

from pipeline.errors import LSIGuardError

# Uninstalling a package leaves its folder behind when the package wrote files into it at run time
# (gradio does); Python then finds an empty namespace package of that name, which is not the package.
_LEFTOVER = "only a folder named {module!r} without its code, left behind by an uninstall"


class MissingExtraError(LSIGuardError, ImportError):
    """An optional dependency that is not installed, named with the extra that provides it.

    An :class:`ImportError` for code that expects one, and an :class:`LSIGuardError` so that the
    CLI, the stages and the demo print its message instead of a traceback.
    """

    def __init__(self, *, module: str, extra: str, feature: str, reason: str) -> None:
        super().__init__(f"{feature} needs the '{extra}' extra: pip install 'lsi-guard[{extra}]' ({reason})")
        self.name = module
        self.extra = extra


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` and return it, or raise :class:`MissingExtraError` naming ``extra`` and ``feature``.

    ``feature`` is what the user asked for, e.g. ``"lsi-guard serve"``. Any ``ImportError``
    while importing counts: a half-installed extra is fixed by installing it again.
    """
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module=module, extra=extra, feature=feature, reason=str(exc)) from exc
    if getattr(imported, "__file__", None) is None:
        raise MissingExtraError(module=module, extra=extra, feature=feature, reason=_LEFTOVER.format(module=module))
    return imported


def check_installed(module: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` when ``module`` cannot be found, without importing it.

    For features whose import is deliberately late (gradio takes seconds): the check is a cheap
    look-up, so a missing extra is reported before any other work starts.
    """
    spec = _find_spec(module)
    if spec is None:
        raise MissingExtraError(module=module, extra=extra, feature=feature, reason=f"no module named {module!r}")
    if spec.origin is None:
        raise MissingExtraError(module=module, extra=extra, feature=feature, reason=_LEFTOVER.format(module=module))


def installed(module: str) -> bool:
    """Whether ``module`` can be found (and is not a leftover folder), without importing it."""
    spec = _find_spec(module)
    return spec is not None and spec.origin is not None


def _find_spec(module: str) -> ModuleSpec | None:
    """``module``'s import spec, or ``None`` when it cannot be found; nothing is imported."""
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that is missing, or a module without a spec
        return None
