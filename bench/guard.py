"""What the guard costs: the LSI check against a 64-token guarded generation, and ECSO, same requests, same run.

For each of ``--requests`` test-split requests of the default run (images and text-only alike):

- **guarded generation** (what ``Guard.generate`` does for an answered request): the prompt's
  common prefix once through every block into a KV cache, the check (the two framings' tails
  behind that cache, stopped at the probe's deepest layer), then exactly ``--tokens`` greedy
  tokens continued from the same cache (end-of-sequence ignored, so every answer has the same
  length);
- **check alone** (what a refused request costs, ``Guard.check``): prefix and framings to the
  probe's deepest layer only, no answer;
- **undefended**: the same ``--tokens`` tokens, no check (also through the model's own
  ``generate``, to show the session's decode loop is no slower);
- **no reuse** (the baseline the cache sharing is measured against): check alone, then the
  undefended answer from scratch, image and prefix encoded again;
- **ECSO**: its four steps with its configured decoding (``ecso.max_new_tokens``, stopping at
  end-of-sequence), on the same requests, against the undefended answer decoded the same way
  (``adapter.generate``), since answers that stop early make the fixed-length figure unfair to ECSO.

Reported: the check's added time as a fraction of the guarded generation (target <= 25%), the
check-alone time as a fraction of it, the reuse saving, and ECSO's overhead over the undefended
answer. Every path is warmed up once before timing. Then ``bench/prefix_reuse.py``'s figures:
check throughput with and without cross-request prefix reuse, and where a check's time goes.

    python bench/guard.py --requests 8 --tokens 64

Needs the default run (``bash scripts/run.sh``). Prints a table and writes ``bench/results/guard.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.defend.ecso import ECSO
from pipeline.defend.guard import Guard
from pipeline.detect.extraction import row_request
from pipeline.layout import INDEX
from pipeline.models.base import Request
from pipeline.models.session import PrefixSession

RESULTS = Path("bench/results")


def timed(run: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def guarded(guard: Guard, request: Request, tokens: int) -> dict[str, float]:
    """The guard's own session path (``Guard.session_score``), then the answer; seconds per part."""
    started = time.perf_counter()
    session, _ = guard.session_score(request)
    if session is None:
        raise RuntimeError(f"{guard.adapter.info.name} cannot share the prompt prefix; nothing to benchmark")
    check = time.perf_counter() - started - session.timings.prefix  # the framings' tails and the probe
    session.answer(tokens, stop_at_eos=False)
    return {"prefix": session.timings.prefix, "check": check, "answer": session.timings.answer}


def undefended(guard: Guard, request: Request, tokens: int) -> float:
    """The same answer with no check: prefix and answer only."""
    session = PrefixSession(guard.adapter, [request.text, request.text], request.image)  # type: ignore[arg-type]
    session.answer(tokens, stop_at_eos=False)
    return session.timings.prefix + session.timings.answer


def hf_generate(guard: Guard, request: Request, tokens: int) -> float:
    """The undefended answer through the model's own ``generate`` (a check on the session's decode loop)."""
    started = time.perf_counter()
    model = guard.adapter.model  # type: ignore[attr-defined]
    batch = guard.adapter.encode([request])  # type: ignore[attr-defined]
    with torch.inference_mode():
        model.generate(
            **batch,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=guard.adapter.pad_token_id,
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="test-split requests (half with images when possible)")
    parser.add_argument("--tokens", type=int, default=64, help="answer length of the guarded generation")
    parser.add_argument("--run", type=Path, default=Path("."), help="the project folder of a finished run")
    parser.add_argument("--out", type=Path, default=RESULTS / "guard.json")
    parser.add_argument(
        "--skip-prefix-reuse", action="store_true", help="leave out the checks with and without prefix reuse"
    )
    args = parser.parse_args()

    from pipeline.data.index import read_index

    torch.manual_seed(0)
    guard = Guard.from_run(args.run)
    index = read_index(args.run / INDEX).sort("row_id")
    test = index.filter(index["split"] == "test")
    with_image = test.filter(test["image_path"].is_not_null()).head((args.requests + 1) // 2)
    without = test.filter(test["image_path"].is_null()).head(args.requests - with_image.height)
    requests = [row_request(row) for row in [*with_image.to_dicts(), *without.to_dicts()]]
    requests = [Request(r.text, None if r.image is None else args.run / r.image) for r in requests]
    ecso = ECSO(guard.adapter, guard.ecso_config)

    # Warm-up: first calls pay for lazy initialisation (OCR engine, kernels), not for the method.
    warm = requests[0]
    guarded(guard, warm, 2), undefended(guard, warm, 2), hf_generate(guard, warm, 2), guard.scores([warm])

    rows = []
    ecso_records: list = []
    for request in requests:
        parts = guarded(guard, request, args.tokens)
        row = {
            "has_image": request.image is not None,
            "guarded": parts,
            "guarded_total": sum(parts.values()),
            "check_alone": timed(lambda request=request: guard.scores([request])),
            "undefended": undefended(guard, request, args.tokens),
            "undefended_hf_generate": hf_generate(guard, request, args.tokens),
            "ecso": timed(lambda request=request: ecso_records.extend(ecso.run([request]))),
            "undefended_eos": timed(
                lambda request=request: guard.adapter.generate([request], guard.ecso_config.max_new_tokens)
            ),
        }
        row["no_reuse"] = row["check_alone"] + row["undefended"]
        row["ecso_judged_harmful"] = ecso_records[-1].judged_harmful
        rows.append(row)
        print(
            f"  {'image' if row['has_image'] else 'text '}  guarded {row['guarded_total']:.2f}s "
            f"(check {parts['check']:.3f}s)  check alone {row['check_alone']:.3f}s  "
            f"no reuse {row['no_reuse']:.2f}s  undefended {row['undefended']:.2f}s  ecso {row['ecso']:.2f}s "
            f"(vs {row['undefended_eos']:.2f}s)"
        )

    def mean(key: str) -> float:
        return statistics.fmean(float(r[key]) for r in rows)

    check = statistics.fmean(r["guarded"]["check"] for r in rows)
    guarded_total = mean("guarded_total")
    summary = {
        "requests": len(rows),
        "with_image": sum(r["has_image"] for r in rows),
        "tokens": args.tokens,
        "mean_seconds": {
            "guarded_generation": guarded_total,
            "check_in_guarded": check,
            "check_alone": mean("check_alone"),
            "no_reuse_guarded_generation": mean("no_reuse"),
            "undefended_generation": mean("undefended"),
            "undefended_hf_generate": mean("undefended_hf_generate"),
            "ecso": mean("ecso"),
            "undefended_stopping_at_eos": mean("undefended_eos"),
        },
        "check_fraction_of_guarded_generation": check / guarded_total,
        "check_alone_fraction_of_guarded_generation": mean("check_alone") / guarded_total,
        "guarded_over_undefended": guarded_total / mean("undefended"),
        "no_reuse_over_guarded": mean("no_reuse") / guarded_total,
        "ecso_over_undefended": mean("ecso") / mean("undefended_eos"),
        "ecso_judged_harmful": sum(r["ecso_judged_harmful"] for r in rows),
        "model": guard.adapter.info.name,
        "detector": guard.detector.describe(),
        "detector_layers": list(guard.detector.layers),
        "device": str(next(guard.adapter.model.parameters()).device),  # type: ignore[attr-defined]
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    print()
    print(
        f"{len(rows)} requests ({summary['with_image']} with images), {args.tokens}-token answers, {summary['model']}"
    )
    m = summary["mean_seconds"]
    print(f"  guarded generation        {m['guarded_generation']:.3f} s")
    print(
        f"  check inside it           {m['check_in_guarded']:.3f} s   "
        f"{summary['check_fraction_of_guarded_generation']:.1%} of the guarded generation (target <= 25%)"
    )
    print(
        f"  check alone (a refusal)   {m['check_alone']:.3f} s   "
        f"{summary['check_alone_fraction_of_guarded_generation']:.1%}"
    )
    print(
        f"  undefended generation     {m['undefended_generation']:.3f} s   "
        f"guard adds {summary['guarded_over_undefended'] - 1:.1%}"
    )
    print(f"  same, model.generate      {m['undefended_hf_generate']:.3f} s")
    print(
        f"  without cache reuse       {m['no_reuse_guarded_generation']:.3f} s   "
        f"{summary['no_reuse_over_guarded']:.2f}x the guarded generation"
    )
    print(
        f"  ECSO (4 steps)            {m['ecso']:.3f} s   {summary['ecso_over_undefended']:.2f}x the undefended "
        f"answer stopping at end-of-sequence ({m['undefended_stopping_at_eos']:.3f} s); "
        f"{summary['ecso_judged_harmful']} of {len(rows)} answers judged harmful"
    )
    if not args.skip_prefix_reuse:
        # bench/prefix_reuse.py, beside this script: checks with and without cross-request prefix reuse.
        from prefix_reuse import EVERYDAY
        from prefix_reuse import run as prefix_reuse_figures

        print()
        summary["prefix_reuse"] = prefix_reuse_figures(guard, args.run / EVERYDAY)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
