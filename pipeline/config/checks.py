"""Field checks shared by the configuration sections.

Every check names the field as ``section.key`` and says what was expected and what was given,
so a wrong value in ``params.yaml`` is refused where it is read, never later in the pipeline.
Booleans are refused where numbers are expected (in Python ``True`` is an ``int``), and floats
must be finite.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, NoReturn, TypeVar

from pipeline.errors import LSIGuardError

T = TypeVar("T")


class ConfigError(LSIGuardError, ValueError):
    """A ``params.yaml`` value that cannot work, named by its section and key."""


def shown(value: Any) -> str:
    """A value as an error message shows it: its repr and its type (a YAML list, stored as a tuple, as a list)."""
    if isinstance(value, tuple):
        value = list(value)
    return f"{value!r} ({type(value).__name__})"


def refuse(where: str, expected: str, value: Any) -> NoReturn:
    """Raise the one message shape: ``section.key: expected ..., got value (type)``."""
    raise ConfigError(f"{where}: expected {expected}, got {shown(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def whole(where: str, value: Any, minimum: int = 0) -> None:
    """A whole number of at least ``minimum`` (``true`` and ``2.0`` are refused)."""
    if not _is_int(value) or value < minimum:
        refuse(where, f"a whole number >= {minimum}", value)


def number(where: str, value: Any, low: float, high: float = math.inf, *, low_open: bool, high_open: bool) -> None:
    """A finite number in the interval from ``low`` to ``high``; ints are accepted where floats are meant."""
    in_range = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if in_range:
        in_range = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not in_range:
        if high == math.inf:
            expected = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        refuse(where, expected, value)


def positive(where: str, value: Any) -> None:
    """A finite number > 0."""
    number(where, value, 0.0, low_open=True, high_open=True)


def flag(where: str, value: Any) -> None:
    """``true`` or ``false`` (YAML 1.2: ``yes``/``no`` are text, and refused)."""
    if not isinstance(value, bool):
        refuse(where, "true or false", value)


def text(where: str, value: Any) -> None:
    """Text (may be empty where the section gives empty a meaning)."""
    if not isinstance(value, str):
        refuse(where, "text", value)


def choice(where: str, value: Any, options: tuple[str, ...]) -> None:
    """One of ``options``."""
    if not isinstance(value, str) or value not in options:
        refuse(where, f"one of {list(options)}", value)


def choices(where: str, value: Any, options: tuple[str, ...]) -> None:
    """A list of one or more distinct values, each one of ``options``."""
    ok = isinstance(value, tuple) and len(value) > 0 and all(isinstance(i, str) and i in options for i in value)
    if not ok or len(set(value)) != len(value):
        refuse(where, f"a list of one or more distinct values from {list(options)}", value)


def texts(where: str, value: Any, *, nonempty: bool) -> None:
    """A list of non-empty texts (at least one when ``nonempty``)."""
    ok = isinstance(value, tuple) and all(isinstance(item, str) and item.strip() for item in value)
    if not ok or (nonempty and not value):
        refuse(where, f"a list of {'one or more ' if nonempty else ''}non-empty texts", value)


def layer_list(where: str, value: Any, *, nonempty: bool) -> None:
    """A list of distinct block indices (whole numbers >= 0)."""
    ok = isinstance(value, tuple) and all(_is_int(item) and item >= 0 for item in value)
    if not ok or len(set(value)) != len(value) or (nonempty and not value):
        refuse(where, f"a list of {'one or more ' if nonempty else ''}distinct whole numbers >= 0", value)


# cluster.address: a Dask scheduler's address (the protocols distributed speaks), host and optional port.
SCHEDULER_ADDRESS = re.compile(r"(tcp|tls|ucx|ws|wss)://(\[[0-9a-fA-F:.]+\]|[^\s/:\[\]]+)(:\d{1,5})?")
LOCAL_CLUSTER = re.compile(r"local:(\d+)")


def cluster_address(where: str, value: Any) -> None:
    """``auto``, empty (in process), ``local:N`` (N >= 1 worker processes) or a scheduler address such as ``tcp://host:8786``."""
    if not isinstance(value, str):
        refuse(where, "text", value)
    local = LOCAL_CLUSTER.fullmatch(value)
    if value in ("", "auto") or (local and int(local.group(1)) >= 1) or SCHEDULER_ADDRESS.fullmatch(value):
        return
    refuse(
        where, "'auto', '' (in process), 'local:N' with N >= 1, or a scheduler address such as 'tcp://host:8786'", value
    )


def mapping(where: str, value: Any) -> None:
    """A mapping of ``key: value`` settings (not a list, not a single value)."""
    if not isinstance(value, Mapping):
        refuse(where, "a mapping of settings", value)


def from_raw(cls: type[T], where: str, raw: Any) -> T:
    """Build the dataclass ``cls`` from a parsed mapping, refusing unknown keys by name.

    YAML lists become tuples (sections are frozen and hashable); everything else is passed as
    read, and the section's own checks refuse what does not fit.
    """
    if raw is None:
        raw = {}
    mapping(where, raw)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in params section '{where}'; known: {sorted(known)}")
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()}
    return cls(**values)
