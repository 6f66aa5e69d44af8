"""A clock for deadline tests: it reads 0 when the deadline is set and an hour later ever after."""

from __future__ import annotations


class ExpiredClock:
    """Reads 0 when a deadline is set and an hour later ever after."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return 0.0 if self.reads == 1 else 3600.0
