"""What the defence comparison costs: its shared, batched computations against each defence run on its own.

On ``--examples`` test-split requests of the default run (balanced over label and category), in
the same run, taking turns over ``--rounds``:

- **comparison** (``pipeline.evaluate.comparison.run_comparison``, what the ``compare`` stage does): per
  batch of ``--batch-size``, the undefended answer, the LSI check and ECSO's later steps once
  each, every defence composed from them;
- **one defence at a time** (the baseline): for each of no defence, LSI, ECSO and LSI then ECSO,
  every request through ``Guard.generate`` under that policy (the undefended model through the
  adapter's ``generate``), one request at a time, as a user of the guard would run each.

Both give each defence's final response; the script reports how many agree (they should all:
the same greedy decoding of the same prompts, the guard's shared-prefix path against batched
left-padded generation) and the speed-up. Every path is warmed up once before timing.

    python bench/compare.py --examples 16 --batch-size 4 --rounds 2

Needs the default run (``bash scripts/run.sh``). Prints a table and writes ``bench/results/compare.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pipeline.data.benchmarks.loaders import EvalExample, load_prepared, sample_examples
from pipeline.defend.guard import Guard
from pipeline.evaluate.comparison import DEFENCES, run_comparison
from pipeline.evaluate.judges import RefusalPhraseJudge
from pipeline.layout import INDEX
from pipeline.models.base import Request

RESULTS = Path("bench/results")


def one_at_a_time(guard: Guard, examples: list[EvalExample], tokens: int) -> dict[tuple[str, str], str]:
    """Every defence's response to every example, each defence on its own, one request at a time."""
    responses: dict[tuple[str, str], str] = {}
    for defence in DEFENCES:
        for example in examples:
            if defence == "none":
                text = guard.adapter.generate([Request(example.text, example.image)], tokens)[0]
            else:
                text = guard.with_config(policy=defence).generate(example.image, example.text, tokens).response
            responses[defence, example.example_id] = text
    return responses


def shared(guard: Guard, examples: list[EvalExample], tokens: int, batch_size: int) -> dict[tuple[str, str], str]:
    """The comparison's responses, keyed like :func:`one_at_a_time`'s."""
    rows = run_comparison(
        guard, examples, RefusalPhraseJudge(), batch_size=batch_size, max_new_tokens=tokens, progress=False
    )
    return {(row.defence, row.example_id): row.response for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="answer budget (ECSO keeps its own config)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, the two paths taking turns")
    parser.add_argument("--run", type=Path, default=Path("."), help="the project folder of a finished run")
    parser.add_argument("--out", type=Path, default=RESULTS / "compare.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    guard = Guard.from_run(args.run, max_new_tokens=args.tokens)
    examples = sample_examples(load_prepared(args.run / INDEX, "test"), args.examples, seed=0)
    examples = [
        EvalExample(
            example_id=e.example_id,
            benchmark=e.benchmark,
            text=e.text,
            image=None if e.image is None else args.run / e.image,
            label=e.label,
            category=e.category,
            attack=e.attack,
        )
        for e in examples
    ]
    shared(guard, examples[:2], 2, 2), one_at_a_time(guard, examples[:1], 2)  # warm-up

    timings: dict[str, list[float]] = {"comparison": [], "one_at_a_time": []}
    agreement: list[float] = []
    for round_ in range(args.rounds):
        started = time.perf_counter()
        ours = shared(guard, examples, args.tokens, args.batch_size)
        timings["comparison"].append(time.perf_counter() - started)
        started = time.perf_counter()
        theirs = one_at_a_time(guard, examples, args.tokens)
        timings["one_at_a_time"].append(time.perf_counter() - started)
        agreement.append(sum(ours[key] == theirs[key] for key in theirs) / len(theirs))
        print(
            f"  round {round_ + 1}: comparison {timings['comparison'][-1]:.1f} s, one defence at a time "
            f"{timings['one_at_a_time'][-1]:.1f} s, responses agreeing {agreement[-1]:.1%}"
        )

    comparison, baseline = (statistics.fmean(timings[key]) for key in ("comparison", "one_at_a_time"))
    summary = {
        "examples": len(examples),
        "with_image": sum(e.image is not None for e in examples),
        "batch_size": args.batch_size,
        "tokens": args.tokens,
        "defences": list(DEFENCES),
        "mean_seconds": {"comparison": comparison, "one_at_a_time": baseline},
        "speedup": baseline / comparison,
        "responses_agreeing": min(agreement),
        "model": guard.adapter.info.name,
        "device": str(next(guard.adapter.model.parameters()).device),  # type: ignore[attr-defined]
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "timings": timings,
    }
    print()
    print(
        f"{len(examples)} examples ({summary['with_image']} with images) x {len(DEFENCES)} defences, {summary['model']}"
    )
    print(f"  comparison (shared, batches of {args.batch_size})  {comparison:.1f} s")
    print(f"  one defence at a time                 {baseline:.1f} s   speed-up {summary['speedup']:.2f}x")
    print(f"  responses agreeing (worst round)      {summary['responses_agreeing']:.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
