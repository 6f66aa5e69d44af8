"""One thread for all of a guard's model work, with concurrent checks gathered into micro-batches.

A server receives requests on many threads (or one event loop) but the model is one set of
weights that must not run two forwards at once. :class:`ModelWorker` owns a single thread that
runs everything touching the model, in arrival order:

- **checks** (:meth:`ModelWorker.check`) waiting in the queue are gathered into one batch of at
  most ``max_batch`` requests, waiting at most ``max_wait_s`` after the first for more, and scored
  with one :meth:`Guard.check_many` call, so the per-call overhead is shared and throughput grows
  with load; ``max_batch=1`` scores one request at a time;
- **jobs** (:meth:`ModelWorker.submit`, e.g. a whole :meth:`Guard.generate`) run alone.

Each batch runs under :meth:`Guard.time_limit` (``limits.request_timeout_s``). A batch that raises
one of :data:`~pipeline.defend.admission.REQUEST_LIMIT_ERRORS` (one request's user turn over
``limits.max_request_tokens`` when tokenised, or the deadline) is run again one request at a time,
so only the offending request gets the error; check errors inside ``check_many`` follow the
guard's ``on_error`` as usual. Results and errors come back as :class:`concurrent.futures.Future`
objects (``asyncio.wrap_future`` awaits them from an event loop).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from pipeline.defend.admission import REQUEST_LIMIT_ERRORS
from pipeline.defend.decisions import GuardDecision
from pipeline.defend.guard import Guard
from pipeline.errors import LSIGuardError
from pipeline.models.base import Request

T = TypeVar("T")

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_S = 0.020

logger = logging.getLogger(__name__)


class WorkerClosed(LSIGuardError, RuntimeError):
    """Work submitted to a :class:`ModelWorker` after :meth:`ModelWorker.close`."""


@dataclass(frozen=True)
class BatchStats:
    """One batch of checks: how many requests it scored and the seconds of its ``check_many`` call."""

    size: int
    seconds: float


@dataclass
class _Check:
    request: Request
    future: Future[GuardDecision]


@dataclass
class _Job:
    run: Callable[[], object]
    future: Future[object]


_STOP = object()


class ModelWorker:
    """Runs a guard's model work on one thread; concurrent checks are scored in micro-batches.

    ``on_batch`` (optional) is called on the worker thread after every batch of checks with its
    :class:`BatchStats` (the server's metrics). Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        *,
        guard: Guard,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0 seconds, got {max_wait_s!r}")
        self.guard = guard
        self.max_batch = max_batch
        self.max_wait_s = float(max_wait_s)
        self._on_batch = on_batch
        self._queue: queue.Queue[object] = queue.Queue()
        self._waiting = 0  # checks and jobs submitted and not yet started on the model thread
        self._running = 0  # checks (a batch's size) or jobs (one) running on it now
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="lsi-guard-model", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Checks and jobs waiting for the model thread (a gauge for the server's metrics)."""
        return self._waiting

    @property
    def in_flight(self) -> int:
        """Checks (the running batch's size) or jobs (one) on the model thread now."""
        return self._running

    def __enter__(self) -> ModelWorker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def check(self, request: Request) -> Future[GuardDecision]:
        """The guard's decision on ``request``, scored in a batch with whatever checks are waiting."""
        future: Future[GuardDecision] = Future()
        self._put(_Check(request, future))
        return future

    def submit(self, run: Callable[[], T]) -> Future[T]:
        """Run ``run()`` alone on the model thread (after the work queued before it); its result or error."""
        future: Future[T] = Future()
        self._put(_Job(run, future))  # type: ignore[arg-type]
        return future

    def close(self, timeout_s: float | None = None) -> None:
        """Finish the queued work, then stop the thread; later work raises :class:`WorkerClosed`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _put(self, item: _Check | _Job) -> None:
        with self._lock:
            if self._closed:
                raise WorkerClosed("the model worker is closed; no more requests are taken")
            self._waiting += 1
            self._queue.put(item)

    def _started(self, count: int) -> None:
        with self._lock:
            self._waiting -= count
            self._running = count

    def _finished(self) -> None:
        with self._lock:
            self._running = 0

    # -- the model thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            while item is not None:
                if item is _STOP:
                    return
                if isinstance(item, _Job):
                    self._run_job(item)
                    item = None
                    continue
                assert isinstance(item, _Check)
                batch, item = self._gather(item)
                self._run_checks(batch)

    def _gather(self, first: _Check) -> tuple[list[_Check], object | None]:
        """``first`` and the checks that arrive within ``max_wait_s`` of it, up to ``max_batch``.

        Returns the batch and the first item that is not a check (a job, or the stop mark), which
        runs next, after the batch, so the queue's order is kept.
        """
        batch = [first]
        ends = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = ends - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, _Check):
                return batch, item
            batch.append(item)
        return batch, None

    def _run_checks(self, batch: list[_Check]) -> None:
        self._started(len(batch))
        try:
            live = [check for check in batch if check.future.set_running_or_notify_cancel()]
            if live:
                self._score(live)
        finally:
            self._finished()

    def _score(self, batch: list[_Check]) -> None:
        started = time.perf_counter()
        try:
            with self.guard.time_limit():
                decisions = self.guard.check_many([check.request for check in batch])
        except REQUEST_LIMIT_ERRORS as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # One request over a limit fails the whole call: score each alone so it fails by itself.
            logger.info("a batch of %d checks hit a request limit (%s); checking them one at a time", len(batch), exc)
            for check in batch:
                self._score([check])
            return
        except Exception as exc:  # noqa: BLE001 - check_many applies on_error itself; this is unexpected
            logger.exception("a batch of %d checks failed", len(batch))
            for check in batch:
                check.future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(batch), time.perf_counter() - started))
        for check, decision in zip(batch, decisions, strict=True):
            check.future.set_result(decision)

    def _run_job(self, job: _Job) -> None:
        self._started(1)
        try:
            if not job.future.set_running_or_notify_cancel():
                return
            try:
                result = job.run()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
        finally:
            self._finished()
