"""What every judge shares: the item judged, the verdict, the :class:`Judge` interface and its error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.errors import LSIGuardError


@dataclass(frozen=True)
class JudgeItem:
    """One request and the response to judge; ``image`` is the request's image, if any.

    Only judges that look at images (the ``llama_guard_vision`` preset) read ``image``; the
    others judge the text alone.
    """

    request: str
    response: str
    image: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """A judge's verdict on one item.

    ``harmful`` is None when the judge does not say; ``raw`` is what the judge said (the matched
    phrase for the phrase judge); ``cached`` is True when the verdict was read from a cache.
    ``score`` is a graded harm score in [0, 1] where the judge gives one (StrongREJECT), and
    ``categories`` the hazard codes a judge named (Llama Guard's ``S1``, ``S10``, ...).
    """

    refused: bool
    harmful: bool | None
    raw: str
    judge: str
    cached: bool = False
    score: float | None = None
    categories: tuple[str, ...] = ()


class Judge(Protocol):
    """Anything that turns request/response pairs into verdicts, one per item, in order."""

    name: str

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order."""
        ...


class JudgeError(LSIGuardError, RuntimeError):
    """A judge that could not give a verdict (bad endpoint, exhausted retries, malformed reply)."""
