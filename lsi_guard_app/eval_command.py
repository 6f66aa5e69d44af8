"""``lsi-guard eval``: one comparison suite of a finished run, outside DVC.

    lsi-guard eval --suite demo [--limit 8] [--run .] [--output DIR] [--lm-eval-json results.json]

Runs what ``python -m stages.compare SUITE`` runs (every defence of ``compare.defences`` on the
suite's benchmarks, from the run's ``params.yaml``, probe, tau and model), prints the table and
writes the compare stage's files (``rows.jsonl``, ``metrics.json``, ``summary.json``,
``comparison.md``) to ``--output`` (default: ``data/cache/eval/<suite>`` in the run, outside
every DVC output). ``--limit`` keeps at most that many examples per benchmark.
``--lm-eval-json`` also writes the results in lm-evaluation-harness's layout
(:mod:`pipeline.evaluate.lm_eval`). A killed run resumes, as the stage does, from the partial file
beside ``--output``. Exit status: 0 done, 1 done with failed generations (counted in
``n_errors``), 2 bad options or a run that cannot be loaded (nothing is written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from pipeline.config import load_params
from pipeline.errors import LSIGuardError
from pipeline.io import write_json_atomic
from pipeline.layout import DATA, PARAMS

DEFAULT_OUTPUT = DATA / "cache" / "eval"


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    """The ``eval`` subcommand's options."""
    sub = commands.add_parser("eval", help="run a comparison suite (compare.suites.NAME) outside DVC")
    sub.add_argument("--suite", required=True, help="a suite of compare.suites in the run's params.yaml")
    sub.add_argument("--limit", type=positive_int, help="at most this many examples per benchmark")
    sub.add_argument("--run", type=Path, default=Path("."), help="the project folder of a finished run (default: .)")
    sub.add_argument("--output", type=Path, help=f"the results folder (default: RUN/{DEFAULT_OUTPUT}/SUITE)")
    sub.add_argument("--lm-eval-json", type=Path, help="also write the results in lm-evaluation-harness's layout here")


def eval_command(args: argparse.Namespace, stdout: TextIO) -> int:
    """Run the suite, print its table, write its files; the exit status (see the module docstring)."""
    run = Path(args.run)
    # Absolute before the suite runs from inside the run folder, so relative options keep meaning the caller's folder.
    output = (args.output or run / DEFAULT_OUTPUT / args.suite).absolute()
    lm_json = None if args.lm_eval_json is None else args.lm_eval_json.absolute()
    try:
        if not (run / PARAMS).is_file():
            raise LSIGuardError(f"--run {run}: no {PARAMS} there; give the project folder of a finished run")
        params = load_params(run / PARAMS)
        params.compare.suite(args.suite)  # an unknown suite is refused before any work
        if output.exists() and not output.is_dir():
            raise LSIGuardError(f"--output {args.output}: is a file; give a folder for the suite's results")
        if lm_json is not None and lm_json.is_dir():
            raise LSIGuardError(f"--lm-eval-json {args.lm_eval_json}: is a folder; give the path of a JSON file")
        # Imported here: the suite brings torch, transformers and the model code.
        from pipeline.evaluate.comparison import comparison_markdown
        from stages.compare import run_suite

        with contextlib.chdir(run):
            summary = run_suite(args.suite, params, output=output, limit=args.limit)
    # FileNotFoundError too: params.yaml names files (benchmarks, the calibration) that are opened directly.
    except (LSIGuardError, FileNotFoundError) as exc:
        print(f"lsi-guard: error: {exc}", file=sys.stderr)
        return 2
    print(comparison_markdown(summary), file=stdout)
    print(f"lsi-guard: wrote {output}", file=sys.stderr)
    if lm_json is not None:
        from pipeline.evaluate.lm_eval import lm_eval_results

        meta: dict[str, Any] = json.loads((output / "summary.json").read_text(encoding="utf-8"))
        meta.pop("benchmarks")
        write_json_atomic(lm_json, lm_eval_results(args.suite, summary, meta, args.limit, time.time()))
        print(f"lsi-guard: wrote {lm_json} (lm-evaluation-harness layout)", file=sys.stderr)
    failed = any(metrics.get("n_errors") for defences in summary.values() for metrics in defences.values())
    return 1 if failed else 0
