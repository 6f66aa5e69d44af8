"""A deadline for one request's model work, checked before every forward pass of the model.

Python cannot stop a running thread, so the bound is cooperative: while :func:`bounded` is
active, a forward pre-hook on the model and on each of its decoder blocks raises
:class:`RequestTimedOut` once the deadline has passed. Every forward the guard starts (the
prefix, the check, each decoding step of an answer, ECSO's steps, integrated gradients) runs
through those modules, so the request stops within one decoder block's work of the deadline.
Work outside the model is not interrupted: OCR of an image and image decoding run to the end
(they are bounded by ``limits.max_image_pixels`` instead).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from pipeline.errors import LSIGuardError

TIMEOUT_KEY = "limits.request_timeout_s"


class RequestTimedOut(LSIGuardError, TimeoutError):
    """A request that ran past its deadline; the message names the limit to raise."""


class Deadline:
    """A point in time ``seconds`` from now; :meth:`check` raises :class:`RequestTimedOut` after it.

    ``clock`` is a monotonic clock in seconds (tests pass their own).
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise ValueError(f"a deadline needs a positive number of seconds, got {seconds}")
        self.seconds = float(seconds)
        self._clock = clock
        self._ends = clock() + self.seconds

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self._clock() > self._ends

    def check(self) -> None:
        """Raise :class:`RequestTimedOut` when the deadline has passed."""
        if self.expired():
            raise RequestTimedOut(
                f"the request took longer than {TIMEOUT_KEY} = {self.seconds:g} s and was stopped; "
                f"raise {TIMEOUT_KEY} in params.yaml for longer requests"
            )


def watched_modules(adapter: object) -> list[nn.Module]:
    """The adapter's model and its decoder blocks, whichever it exposes as torch modules."""
    modules: list[nn.Module] = []
    model = getattr(adapter, "model", None)
    if isinstance(model, nn.Module):
        modules.append(model)
    blocks = getattr(adapter, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        modules.extend(blocks)
    return modules


@contextmanager
def bounded(adapter: object, deadline: Deadline | None) -> Iterator[None]:
    """Run the body with ``deadline`` checked before each forward of the adapter's model and blocks.

    ``None`` runs the body unbounded. The deadline is also checked on entry. A body that finishes
    is never thrown away for finishing late.
    """
    if deadline is None:
        yield
        return
    deadline.check()

    def hook(_module: nn.Module, _inputs: object) -> None:
        deadline.check()

    handles = [module.register_forward_pre_hook(hook) for module in watched_modules(adapter)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
