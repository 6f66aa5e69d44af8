"""The ``run`` record every metrics file and report carries, and the library versions stores and probes keep.

A number is only comparable with another when both came from the same code, libraries, device
and model. :func:`build_run_record` gathers those facts in one JSON-ready dict: the project
version and git commit (with a dirty flag), the Python and library versions, the device, the
model's name and revision, and the stage's wall time. Outside a git checkout (an installed
package, a copied folder) or where git is missing or slow, the commit is ``"unknown"``: a run
record never fails a stage.

Activation stores and saved probes record :func:`library_versions` of the libraries that compute
hidden states (:data:`HIDDEN_STATE_LIBRARIES`) when written; :func:`warn_if_versions_differ`
warns a reader that finds others, since the same model may then give different states.
"""

from __future__ import annotations

import platform
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.version import __version__

# The versions a run record names: what computes the numbers (torch, transformers), stores them
# (zarr) and drives the pipeline (dvc).
RECORDED_LIBRARIES: tuple[str, ...] = ("torch", "transformers", "zarr", "dvc")
# The libraries whose version can change a model's hidden states for the same weights and input.
HIDDEN_STATE_LIBRARIES: tuple[str, ...] = ("torch", "transformers")
UNKNOWN = "unknown"
NOT_INSTALLED = "not installed"
# git answers in milliseconds; a hung network file system or a huge repository must not hold a stage.
GIT_TIMEOUT_S = 2.0
LOCK_FILES: tuple[str, ...] = ("dvc.lock", "dev/dvc.lock")


class LibraryVersionWarning(UserWarning):
    """A store or probe written under other library versions than this process runs."""


def library_versions(names: Sequence[str] = RECORDED_LIBRARIES) -> dict[str, str]:
    """Each installed distribution's version, from its metadata (nothing is imported); ``"not installed"`` if absent."""
    versions: dict[str, str] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def _git(root: Path, *args: str) -> str | None:
    """git's standard output for ``args`` in ``root``, or None when git is missing, slow or fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: str | Path = ".") -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the checkout holding ``root``; ``"unknown"`` / None outside one.

    Dirty means tracked files differ from the commit; untracked files (data, the model link) and the
    DVC lock files (:data:`LOCK_FILES`, which a run itself rewrites) do not count.
    """
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return {"commit": UNKNOWN, "dirty": None}
    # dvc.lock is rewritten by `dvc repro` after each stage, so counting it would mark every stage
    # after the first of a clean checkout's run as dirty.
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *(f":(exclude){p}" for p in LOCK_FILES))
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def build_run_record(
    *,
    model_name: str,
    model_revision: str,
    device: str,
    wall_time_s: float,
    root: str | Path = ".",
) -> dict[str, Any]:
    """The ``run`` record of a stage: code, libraries, device, model and wall time (JSON-ready)."""
    git = git_state(root)
    return {
        "project_version": __version__,
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "python": platform.python_version(),
        "libraries": library_versions(),
        "device": device,
        "model_name": model_name,
        "model_revision": model_revision,
        "wall_time_s": round(wall_time_s, 3),
    }


def version_differences(recorded: Mapping[str, Any], current: Mapping[str, str]) -> list[str]:
    """The libraries of ``current`` whose version ``recorded`` names differently (ones it does not name are skipped)."""
    return [name for name in current if name in recorded and str(recorded[name]) != current[name]]


def version_mismatch_message(what: str, recorded: Mapping[str, Any], current: Mapping[str, str]) -> str | None:
    """``"<what> was written with torch A; this is torch B: hidden states may differ"``, or None when they match."""
    names = version_differences(recorded, current)
    if not names:
        return None
    then = ", ".join(f"{name} {recorded[name]}" for name in names)
    now = ", ".join(f"{name} {current[name]}" for name in names)
    return f"{what} was written with {then}; this is {now}: hidden states may differ"


def warn_if_versions_differ(what: str, recorded: object) -> None:
    """Warn (:class:`LibraryVersionWarning`) when ``recorded`` hidden-state library versions differ from this process's.

    ``recorded`` is what the writer stored (a mapping); anything else (a file written before
    versions were recorded) is passed over in silence. A difference is never an error: the
    states may well be the same, and the reader decides whether to re-extract.
    """
    if not isinstance(recorded, Mapping):
        return
    message = version_mismatch_message(what, recorded, library_versions(HIDDEN_STATE_LIBRARIES))
    if message is not None:
        warnings.warn(message, LibraryVersionWarning, stacklevel=3)
