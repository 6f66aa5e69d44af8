"""Where a command's guard comes from: a finished run (``--run``) or a saved guard (``--guard``), never both.

``--guard`` takes the folder ``lsi-guard export`` or ``Guard.save_pretrained`` wrote, or a Hugging
Face Hub id (fetched into the Hub cache; ``HF_HUB_OFFLINE=1`` reads the cache only), and
``--model`` the model folder to run it on when not the one the saved guard records. The limits
and policy are read before the model loads (:func:`guard_source`), so that bad input is refused
at once; only JSON is read for that, and a saved guard's files are all checked against its
manifest first.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import LimitsConfig, load_params
from pipeline.defend.bundle import bundle_limits_and_policy
from pipeline.errors import LSIGuardError
from pipeline.layout import PARAMS

if TYPE_CHECKING:
    from pipeline.defend.guard import Guard

DEFAULT_RUN = Path(".")


class SourceError(LSIGuardError, ValueError):
    """Options that do not name one guard (``--model`` without ``--guard``)."""


def add_source_arguments(sub: argparse.ArgumentParser) -> None:
    """``--run`` or ``--guard`` (argparse refuses both), and ``--model`` for ``--guard``."""
    source = sub.add_mutually_exclusive_group()
    source.add_argument(
        "--run", type=Path, default=None, help="the project folder of a finished run (default: .; not with --guard)"
    )
    source.add_argument(
        "--guard",
        metavar="DIR_OR_HUB_ID",
        help="a saved guard instead of a run: the folder `lsi-guard export` wrote, or a Hugging Face Hub repository id",
    )
    sub.add_argument(
        "--model",
        type=Path,
        help="with --guard: the model folder to run on (default: the folder the saved guard records)",
    )


@dataclass(frozen=True, kw_only=True)
class GuardSource:
    """A command's guard before it loads: the run folder or the saved guard's local folder, its limits and policy."""

    run: Path | None
    bundle: Path | None
    model: Path | None
    limits: LimitsConfig
    policy: str

    def describe(self) -> str:
        """``run <folder>`` or ``guard <folder>``, for start-up lines."""
        return f"run {self.run.resolve()}" if self.run is not None else f"guard {self.bundle}"


def guard_source(run: Path | None, guard: str | None, model: Path | None) -> GuardSource:
    """The guard the options name, with its limits and policy read from JSON or YAML only (no model).

    A Hub id is fetched here, so that the model's load and every later step read a local folder.
    A run folder without params.yaml gets the default limits: loading the guard then says what is missing.
    """
    if guard is None:
        if model is not None:
            raise SourceError("--model goes with --guard; a run's model is the one its params.yaml names")
        folder = DEFAULT_RUN if run is None else run
        params = folder / PARAMS
        if not params.is_file():
            return GuardSource(run=folder, bundle=None, model=None, limits=LimitsConfig(), policy="lsi")
        loaded = load_params(params)
        return GuardSource(run=folder, bundle=None, model=None, limits=loaded.limits, policy=loaded.guard.policy)
    bundle, limits, policy = bundle_limits_and_policy(guard)
    return GuardSource(run=None, bundle=bundle, model=model, limits=limits, policy=policy)


def load_guard(
    source: GuardSource,
    *,
    policy: str | None = None,
    on_error: str | None = None,
    ecso_margin: float | None = None,
    max_new_tokens: int | None = None,
) -> Guard:
    """The guard of ``source`` with the given ``guard`` settings overridden (None keeps the saved ones)."""
    # Imported here: the guard brings torch and the model code, seconds that bad input need not wait for.
    from pipeline.defend.guard import Guard

    if source.bundle is not None:
        return Guard.from_pretrained(
            source.bundle,
            model=source.model,
            policy=policy,
            on_error=on_error,
            ecso_margin=ecso_margin,
            max_new_tokens=max_new_tokens,
        )
    return Guard.from_run(
        DEFAULT_RUN if source.run is None else source.run,
        policy=policy,
        on_error=on_error,
        ecso_margin=ecso_margin,
        max_new_tokens=max_new_tokens,
    )
