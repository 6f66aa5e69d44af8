"""What concurrency buys the HTTP judge: verdicts a second with requests in flight against one at a time.

A fake OpenAI-compatible endpoint on 127.0.0.1 (``pipeline.testing.judge_server``: FastAPI and
uvicorn in a thread, each reply after ``--delay`` seconds of ``asyncio.sleep``, as a remote judge
model would take) answers the :class:`~pipeline.evaluate.judges.HTTPJudge`, through the official
``openai`` client, with no rate cap and no cache, in the same run:

- **concurrent**: ``--items`` verdicts with ``--concurrency`` requests in flight;
- **sequential** (the baseline): ``--baseline-items`` verdicts with concurrency 1 (fewer, since
  each costs the full delay; compared per verdict).

Then the concurrent run again on a cache filled by a first pass, which must ask nothing.

    python bench/judge.py --items 500 --concurrency 16 --baseline-items 50

Prints the wall times and the speed-up; writes ``bench/results/judge.json``. Needs no model.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from pipeline.evaluate.judges import HTTPJudge, JudgeItem
from pipeline.testing.judge_server import FakeJudgeServer

RESULTS = Path("bench/results")


def items(count: int, offset: int = 0) -> list[JudgeItem]:
    """``count`` distinct questions, a third of them with an answer the fake judge calls harmful."""
    return [
        JudgeItem(f"question {offset + i}", "[harmful] steps" if i % 3 == 0 else "I can't help with that.")
        for i in range(count)
    ]


def timed(server: FakeJudgeServer, batch: list[JudgeItem], concurrency: int, cache: Path | None) -> float:
    """Seconds for one judge call on ``batch``; checks every verdict against the fake judge's rule."""
    judge = HTTPJudge(
        base_url=server.url,
        model="fake-judge",
        api_key_env=None,
        requests_per_minute=0,
        concurrency=concurrency,
        cache_path=cache,
    )
    started = time.perf_counter()
    verdicts = judge.judge(batch)
    seconds = time.perf_counter() - started
    judge.close()
    wrong = [item for item, v in zip(batch, verdicts, strict=True) if v.harmful != ("[harmful]" in item.response)]
    if wrong:
        raise SystemExit(f"{len(wrong)} verdicts disagree with the fake judge, e.g. {wrong[0]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--baseline-items", type=int, default=50, help="verdicts asked one at a time")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds the fake endpoint takes per reply")
    parser.add_argument("--out", type=Path, default=RESULTS / "judge.json")
    args = parser.parse_args()

    with FakeJudgeServer(delay_s=args.delay) as server, tempfile.TemporaryDirectory() as scratch:
        timed(server, items(4, offset=10**6), args.concurrency, None)  # warm-up: connections, imports
        concurrent = timed(server, items(args.items), args.concurrency, None)
        max_in_flight = server.max_in_flight
        sequential = timed(server, items(args.baseline_items, offset=10**7), 1, None)
        cache = Path(scratch) / "judge.sqlite"
        timed(server, items(args.items, offset=10**8), args.concurrency, cache)
        asked = server.total_calls
        rerun = timed(server, items(args.items, offset=10**8), args.concurrency, cache)
        rerun_asked = server.total_calls - asked

    per_verdict = {"concurrent": concurrent / args.items, "sequential": sequential / args.baseline_items}
    summary = {
        "items": args.items,
        "concurrency": args.concurrency,
        "baseline_items": args.baseline_items,
        "delay_s": args.delay,
        "seconds": {"concurrent": concurrent, "sequential": sequential, "cached_rerun": rerun},
        "seconds_per_verdict": per_verdict,
        "speedup": per_verdict["sequential"] / per_verdict["concurrent"],
        "max_in_flight": max_in_flight,
        "cached_rerun_requests": rerun_asked,
        "machine": platform.machine(),
    }
    print(f"HTTP judge on a fake endpoint answering after {args.delay:.2f} s (openai client, no rate cap)")
    print(
        f"  {args.items} verdicts, concurrency {args.concurrency}:  {concurrent:.2f} s  (max {max_in_flight} in flight)"
    )
    print(f"  {args.baseline_items} verdicts, one at a time:     {sequential:.2f} s")
    print(
        f"  per verdict: {1000 * per_verdict['concurrent']:.1f} ms against {1000 * per_verdict['sequential']:.1f} ms, "
        f"speed-up {summary['speedup']:.1f}x"
    )
    print(f"  rerun on the cache: {rerun:.2f} s, {rerun_asked} requests")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
