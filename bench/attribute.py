"""Attribution time with the framings' common start run once against each framing run whole, in one run.

Under ``prompts.position: after`` the benign and malicious prompts share every token up to the
framing, the request and any OCR text included. The attribute stage's integrated gradients then
run that start once per interpolation point and branch for the framings' tails
(``IGSettings.share_starts``); this script attributes the attribute stage's own example rows
(``params.attribute``: its rows, steps and target) both ways, in ``--rounds`` rounds whose order
rotates, and reports per-row seconds, the total ratio and the largest difference between the two
ways' token scores (the same integral, rounded differently).

    python bench/attribute.py              # 1 round, the stage's rows and steps
    python bench/attribute.py --rounds 2 --steps 32

Needs the default pipeline's store and shipped detector (``dvc repro export``). Prints a table and
writes ``bench/results/attribute.json``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from prefix_reuse import rotated, spread  # bench/prefix_reuse.py: the interleaved rounds' order and spread

from pipeline.config import load_params
from pipeline.data.index import read_index
from pipeline.data.rows import pick_examples
from pipeline.detect.extraction import row_request
from pipeline.detect.shipped import load_detector
from pipeline.explain.attribution import attribution_target
from pipeline.explain.embedded import embedded_attribution
from pipeline.explain.integrated import IGSettings
from pipeline.explain.record import Attribution
from pipeline.io import write_json_atomic
from pipeline.layout import INDEX, PROBE_DIR
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.registry import load_adapter

RESULTS = Path("bench/results")
WAYS = {"shared start": True, "each framing whole": False}


def scores(attribution: Attribution) -> np.ndarray:
    """Every token score of an attribution (request, then OCR text), as one vector."""
    found = list(attribution.token_scores) + list(attribution.ocr_token_scores or [])
    return np.asarray(found, dtype=np.float64)


def main() -> None:
    """Attribute the stage's rows both ways, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both ways, order rotating (>= 1)")
    parser.add_argument("--steps", type=int, help="interpolation points (default: params attribute.steps)")
    parser.add_argument("--out", type=Path, default=RESULTS / "attribute.json")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: a whole number >= 1")
    params = load_params()
    steps = args.steps or params.attribute.steps
    rows = pick_examples(read_index(INDEX), params.attribute.examples).to_dicts()
    detector, meta = load_detector(PROBE_DIR)
    target = attribution_target(params.attribute.target, detector, meta.fusion_layer)
    adapter = load_adapter(params.model, params.limits.max_request_tokens)
    if not isinstance(adapter, EmbeddedAdapter):
        raise SystemExit("bench/attribute.py times the embedded default model (model.kind: embedded)")
    print(
        f"{target.label}: {len(rows)} rows, {steps} steps, prompts.position {params.prompts.position}, "
        f"torch threads {torch.get_num_threads()}"
    )
    seconds: dict[str, dict[str, list[float]]] = {way: {} for way in WAYS}
    largest_gap = 0.0
    for round_ in range(args.rounds):
        for row in rows:
            request, key = row_request(row), str(row["row_id"])
            found = {}
            for way in rotated(list(WAYS), round_):
                settings = IGSettings(target=target, steps=steps, share_starts=WAYS[way])
                start = time.perf_counter()
                found[way] = embedded_attribution(adapter, request, params.prompts, settings)
                seconds[way].setdefault(key, []).append(time.perf_counter() - start)
            shared, whole = (scores(found[way]) for way in WAYS)
            gap = float(np.max(np.abs(shared - whole))) / max(float(np.max(np.abs(whole))), 1e-12)
            largest_gap = max(largest_gap, gap)
            print(
                f"round {round_ + 1} row {key} ({row.get('source')}): "
                + ", ".join(f"{way} {seconds[way][key][-1]:.2f} s" for way in WAYS)
                + f"; largest score gap {gap:.2e} of the largest score"
            )
    totals = {way: [sum(per_row[r] for per_row in seconds[way].values()) for r in range(args.rounds)] for way in WAYS}
    pairs = zip(totals["shared start"], totals["each framing whole"], strict=True)
    ratios = [whole / shared for shared, whole in pairs]
    summary = spread(ratios)
    for way in WAYS:
        print(f"{way:20s} total {np.median(totals[way]):7.2f} s over {len(rows)} rows")
    print(f"each framing whole / shared start: {summary['median']:.2f}x ({summary['min']:.2f}-{summary['max']:.2f})")
    record = {"machine": platform.machine(), "processor": platform.processor()}
    record |= {"torch_threads": torch.get_num_threads()}
    record |= {"target": target.label, "steps": steps, "position": params.prompts.position, "rows": len(rows)}
    record |= {"seconds": seconds, "totals": totals, "largest_relative_score_gap": largest_gap, "speedup": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
