"""Replacing a finished activation store by a new one, safely against a kill at any moment.

A store is written beside its target (``store.zarr.partial``) and swapped into place when
complete. A run killed at any moment loses nothing: the next run resumes the partial store, and
a swap cut short is finished or undone, so there is always a good old store or a resumable one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.io import rename_durable


def partial_path(store: Path) -> Path:
    """Where the store is written until it is complete."""
    return store.with_name(store.name + ".partial")


def old_path(store: Path) -> Path:
    """Where the previous store waits during a swap, until the new one is in place."""
    return store.with_name(store.name + ".old")


def recover_swap(store: Path) -> None:
    """Finish or undo a swap that a killed run left half done (nothing to do after a clean run).

    A swap is: rename ``store`` to ``.old``, rename ``.partial`` to ``store``, remove ``.old``.
    With ``.old`` and ``store`` both there, only the removal was cut short; with ``.old`` alone,
    the old store goes back into place and the complete partial waits for the next swap.
    """
    old = old_path(store)
    if not old.exists():
        return
    if store.exists():
        shutil.rmtree(old)
    else:
        rename_durable(old, store)


def swap_into_place(partial: Path, store: Path) -> None:
    """Replace ``store`` (if any) by the complete ``partial``; a kill at any step is handled by :func:`recover_swap`."""
    old = old_path(store)
    if store.exists():
        rename_durable(store, old)
    rename_durable(partial, store)
    if old.exists():
        shutil.rmtree(old)
