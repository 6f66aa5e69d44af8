"""Cross-request prefix reuse in the guard's checks: throughput with and without it, same run, same decisions.

Workloads (text only, so every request shares the chat template's start):

- **everyday**: the shipped everyday set's typed requests (``data/demo/everyday.jsonl``), a dozen
  words each, the length most chat traffic has;
- **200-token**: each everyday request followed by other requests' text until it is at least 200
  tokens long, so ``guard.views: ends`` scores it three times (whole, first and last words).

Each workload is checked with ``Guard.check_many`` in batches of 1 (a single check) and of 16
(the proxy's default micro-batch) three ways: reuse off (the path before it), the cached template
start only, and that plus the longer starts rows of one batch share (a long request's views; the
default). The three are interleaved: each of ``--rounds`` rounds times one pass of each, back to
back, in an order rotated per round, so load from elsewhere on shared cores cannot land on one way
alone. The cache is built by a warm-up batch before each pass, as the first request of a process
builds it. Reported per cell: checks/s (median pass), the ratios within each round (median and
range over rounds), and whether every decision and score matches (scores within 1e-4).
Then where a check's time goes, with and without reuse: the prefix forwards (each request's
shared prompt start; with reuse only the part after the cached start), the framings' forwards,
the rest (tokenising, the probe, Python), and what the extra views add (``ends`` against
``whole``).

    python bench/prefix_reuse.py --run .        # also run by bench/guard.py

Needs the default run (``bash scripts/run.sh``). Prints a table and writes ``bench/results/prefix_reuse.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.defend.guard import Guard
from pipeline.models.base import Request
from pipeline.models.prefix_cache import prefix_cache, set_prefix_reuse

RESULTS = Path("bench/results")
EVERYDAY = Path("data/demo/everyday.jsonl")
LONG_TOKENS = 200
BATCHES = (1, 16)
ROUNDS = 5


def everyday_texts(path: Path) -> list[str]:
    """The everyday set's typed requests (rows whose request is in the image are left out: no image here)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["text"] for row in rows if row.get("image") is None]


def long_texts(guard: Guard, texts: list[str], tokens: int) -> list[str]:
    """Each text followed by the next ones until the model's tokenizer counts at least ``tokens`` tokens."""
    tokenizer = guard.adapter.tokenizer  # type: ignore[attr-defined]
    out = []
    for i, text in enumerate(texts):
        parts, j = [text], i + 1
        while len(tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"]) < tokens:
            parts.append(texts[j % len(texts)])
            j += 1
        out.append(" ".join(parts))
    return out


class ForwardClock:
    """Seconds spent in the model's forwards, split into prefix forwards and the framings' (packed, 4-D mask).

    For a detector that reads one prompt, "framings" is each request's rest behind the cached start.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = {"prefix": 0.0, "framings": 0.0}
        self._started: list[tuple[str, float]] = []
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]

    def _pre(self, _module: torch.nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        part = "framings" if mask is not None and mask.dim() == 4 else "prefix"
        self._started.append((part, time.perf_counter()))

    def _post(self, *_args: Any, **_kwargs: Any) -> None:
        part, started = self._started.pop()
        self.seconds[part] += time.perf_counter() - started

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def clocked(guard: Guard) -> Iterator[ForwardClock]:
    clock = ForwardClock(guard.adapter.model)  # type: ignore[attr-defined]
    try:
        yield clock
    finally:
        clock.remove()


def check_all(guard: Guard, requests: list[Request], batch: int) -> tuple[float, list[tuple[str, float | None]]]:
    """Seconds to check every request in batches of ``batch``, and the decisions (action, score)."""
    decisions = []
    started = time.perf_counter()
    for start in range(0, len(requests), batch):
        decisions += guard.check_many(requests[start : start + batch])
    seconds = time.perf_counter() - started
    return seconds, [(d.action, d.score) for d in decisions]


def same(a: list[tuple[str, float | None]], b: list[tuple[str, float | None]]) -> tuple[bool, float]:
    """Whether the decisions match (actions equal, scores within 1e-4), and the largest score difference."""
    gap = max((abs((x or 0.0) - (y or 0.0)) for (_, x), (_, y) in zip(a, b, strict=True)), default=0.0)
    return all(x == y for (x, _), (y, _) in zip(a, b, strict=True)) and gap <= 1e-4, gap


# Reuse off (the path before it); the cached template start only; and that plus the longer starts
# rows of one batch share (a long request's views), the default.
MODES = {"off": None, "start": False, "on": True}


def set_mode(guard: Guard, mode: str) -> None:
    """Reuse as ``mode`` says (see :data:`MODES`), with a fresh cache."""
    share = MODES[mode]
    set_prefix_reuse(guard.adapter, share is not None, share_in_batch=bool(share))


def rotated(items: list[str], shift: int) -> list[str]:
    """``items`` starting at position ``shift`` (mod its length), wrapping round."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def spread(values: list[float]) -> dict[str, float | list[float]]:
    """Median, lowest and highest of ``values``, and the values themselves (rounded)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": [round(v, 3) for v in values],
    }


def measure(guard: Guard, workloads: dict[str, list[Request]], rounds: int) -> dict[str, Any]:
    """Every workload and batch size in every mode, the modes interleaved over ``rounds`` rounds.

    Each round times one pass in every mode, back to back, in an order rotated from round to round.
    A ratio is taken within a round (modes seconds apart), and the median over rounds is reported
    with its range: on shared cores a burst of load elsewhere then spoils one round's ratio, not the
    figure, where timing every pass of one mode before the next lets it land on one mode alone.
    """
    cells: dict[str, Any] = {}
    for name, requests in workloads.items():
        for batch in BATCHES:
            seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
            decisions: dict[str, list[tuple[str, float | None]]] = {}
            for round_ in range(rounds):
                for mode in rotated(list(MODES), round_):
                    set_mode(guard, mode)
                    guard.check_many(requests[:batch])  # warm-up (builds the cache entry when on)
                    took, made = check_all(guard, requests, batch)
                    seconds[mode].append(took)
                    decisions.setdefault(mode, made)
            identical, gap = same(decisions["off"], decisions["on"])
            start_identical, start_gap = same(decisions["off"], decisions["start"])
            speedup = spread([off / on for off, on in zip(seconds["off"], seconds["on"], strict=True)])
            start_only = spread([off / st for off, st in zip(seconds["off"], seconds["start"], strict=True)])
            in_batch = spread([st / on for st, on in zip(seconds["start"], seconds["on"], strict=True)])
            cell = {
                "requests": len(requests),
                "batch": batch,
                "rounds": rounds,
                "checks_per_s_without_reuse": len(requests) / statistics.median(seconds["off"]),
                "checks_per_s_start_only": len(requests) / statistics.median(seconds["start"]),
                "checks_per_s_with_reuse": len(requests) / statistics.median(seconds["on"]),
                "speedup": speedup["median"],
                "speedup_spread": speedup,
                "speedup_start_only": start_only["median"],
                "speedup_start_only_spread": start_only,
                "in_batch_gain": in_batch["median"],
                "identical_decisions": identical and start_identical,
                "largest_score_difference": max(gap, start_gap),
            }
            cells[f"{name}/batch{batch}"] = cell
            print(
                f"  {name:9s} batch {batch:>2}: off {cell['checks_per_s_without_reuse']:6.2f}, start only "
                f"{cell['checks_per_s_start_only']:6.2f}, on {cell['checks_per_s_with_reuse']:6.2f} checks/s  "
                f"{cell['speedup']:.2f}x (rounds {speedup['min']:.2f}-{speedup['max']:.2f}; start only "
                f"{cell['speedup_start_only']:.2f}x, in-batch {cell['in_batch_gain']:.2f}x)  identical "
                f"{cell['identical_decisions']} (max score diff {cell['largest_score_difference']:.1e})",
                flush=True,
            )
    return cells


def breakdown(guard: Guard, requests: list[Request], batch: int) -> dict[str, dict[str, float]]:
    """Seconds per check by part in every mode: prefix, framings, rest, and the extra views."""
    parts: dict[str, dict[str, float]] = {}
    whole = guard.with_config(views="whole")
    for mode in MODES:
        set_mode(guard, mode)
        guard.check_many(requests[:batch])
        with clocked(guard) as clock:
            total, _ = check_all(guard, requests, batch)
        whole_seconds, _ = check_all(whole, requests, batch)
        n = len(requests)
        parts[mode] = {
            "total": total / n,
            "prefix": clock.seconds["prefix"] / n,
            "framings": clock.seconds["framings"] / n,
            "rest": (total - clock.seconds["prefix"] - clock.seconds["framings"]) / n,
            "views_added": (total - whole_seconds) / n,
        }
    return parts


def run(guard: Guard, everyday: Path, rounds: int = ROUNDS) -> dict[str, Any]:
    """The whole benchmark on ``guard``; reuse is left on afterwards."""
    texts = everyday_texts(everyday)
    workloads = {
        "everyday": [Request(text) for text in texts],
        f"{LONG_TOKENS}-token": [Request(text) for text in long_texts(guard, texts, LONG_TOKENS)],
    }
    print(f"prefix reuse: {len(texts)} requests per workload, views {guard.config.views}", flush=True)
    cells = measure(guard, workloads, rounds)
    parts = {name: breakdown(guard, requests, 16) for name, requests in workloads.items()}
    for name, modes in parts.items():
        for mode, seconds in modes.items():
            print(
                f"  per check, {name}, reuse {mode:5s}: total {seconds['total'] * 1000:6.1f} ms = prefix "
                f"{seconds['prefix'] * 1000:5.1f} + framings {seconds['framings'] * 1000:5.1f} + rest "
                f"{seconds['rest'] * 1000:5.1f}; views add {seconds['views_added'] * 1000:5.1f} ms"
            )
    set_mode(guard, "on")
    guard.check_many(workloads["everyday"][:1])
    cache = prefix_cache(guard.adapter)
    stats = None if cache is None else cache.stats().__dict__
    return {
        "cells": cells,
        "per_check_seconds_batch16": parts,
        "cache_after_one_check": stats,
        "views": guard.config.views,
        "model": guard.adapter.info.name,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("."), help="the project folder of a finished run")
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help="interleaved rounds per cell; ratios are the median over rounds"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "prefix_reuse.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    guard = Guard.from_run(args.run)
    figures = run(guard, args.run / EVERYDAY, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
