"""Run :func:`~pipeline.detect.extraction.extract_to_store` in a process of its own, for the kill test.

Two ways to start a run::

    python tests/extract_worker.py run MODEL_FOLDER INDEX_PARQUET STORE_PATH --log LOG [options]
    python tests/extract_worker.py serve

``run`` is one whole process: interpreter start, imports, model load, extraction. ``serve``
imports the heavy libraries once (about 8 s of the start-up on 2 cores) and then, for every
JSON list of ``run`` arguments read on stdin, forks a child that does the rest; it answers
``pid PID`` when the child starts and ``exit PID CODE`` when it ends (CODE -9: SIGKILL). That is
how the test affords twenty real kills.

A run writes one flushed line per step to its log, so the test can aim its SIGKILL: ``loaded``
(model ready), ``start``, ``creating``/``created`` (a new store), ``write START``/``wrote START``
per shard, ``completing``/``completed``, ``done``. ``--slow-sync`` waits that long before each
file's fsync, as a slow disk would, so a kill that follows a ``write``, ``creating`` or
``completing`` line lands while a file is half way into place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TextIO

_log: TextIO = sys.stdout


def say(line: str) -> None:
    """One progress line for the test, flushed at once."""
    _log.write(line + "\n")
    _log.flush()


def announce(method: Callable[..., Any], before: str, after: str, with_start: bool = False) -> Callable[..., Any]:
    """``method`` wrapped to log ``before`` and ``after`` around each call (with the block start if asked)."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        suffix = f" {args[1]}" if with_start else ""
        say(before + suffix)
        result = method(*args, **kwargs)
        say(after + suffix)
        return result

    return wrapped


def slow_sync(delay: float) -> None:
    """Make every durable write wait ``delay`` seconds with its temp file written but not yet in place."""
    import pipeline.io

    original = pipeline.io._sync_file

    def sync(file: BinaryIO) -> None:
        time.sleep(delay)
        original(file)

    pipeline.io._sync_file = sync


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    """The arguments of one run."""
    parser = argparse.ArgumentParser(prog="extract_worker.py run")
    parser.add_argument("model_folder", type=Path)
    parser.add_argument("index", type=Path)
    parser.add_argument("store", type=Path)
    parser.add_argument("--log", type=Path)
    parser.add_argument("--shard-rows", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--layers", default="0,1,3")
    parser.add_argument("--slow-sync", type=float, default=0.0)
    return parser.parse_args(argv)


def run(argv: list[str]) -> None:
    """Load the model, then extract the index into the store, logging each step."""
    global _log
    args = parse_run_args(argv)
    if args.log is not None:
        _log = open(args.log, "a", encoding="utf-8")  # kept open for the life of the process

    import polars as pl
    import torch

    from pipeline.config import ContrastivePrompts, ExtractConfig
    from pipeline.detect.extraction import extract_to_store
    from pipeline.detect.store import ActivationStore
    from pipeline.models.hf_vlm import HFVisionLanguageAdapter

    torch.set_num_threads(1)  # the same arithmetic in every run, and no fight over the test's cores
    adapter = HFVisionLanguageAdapter.from_folder(args.model_folder, device="cpu")
    index = pl.read_parquet(args.index)
    layers = tuple(int(k) for k in args.layers.split(","))
    config = ExtractConfig(layers=layers, batch_size=args.batch_size, shard_rows=args.shard_rows)
    if args.slow_sync:
        slow_sync(args.slow_sync)
    ActivationStore._initialise = staticmethod(announce(ActivationStore._initialise, "creating", "created"))
    ActivationStore.write_block = announce(ActivationStore.write_block, "write", "wrote", with_start=True)
    ActivationStore.mark_complete = announce(ActivationStore.mark_complete, "completing", "completed")
    say("loaded")
    say("start")
    extract_to_store(adapter, index, ContrastivePrompts(), config, args.store, progress=False)
    say("done")


def serve() -> None:
    """Import the heavy libraries once, then fork one child per run asked for on stdin."""
    import torch  # noqa: F401 - imported for the children
    import transformers  # noqa: F401

    import pipeline.detect.extraction  # noqa: F401
    import pipeline.models.hf_vlm  # noqa: F401

    # No thread pool is started here (no torch op, no zarr or polars call): forking is safe.
    print("ready", flush=True)
    for line in sys.stdin:
        argv = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(argv)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


def main() -> None:
    """``run ARGS...`` or ``serve``."""
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["run"]:
        run(sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
