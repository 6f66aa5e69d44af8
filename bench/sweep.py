"""The layer sweep's cost: held-out half on every pair against a shortlist, in the same run.

The sweep fits LSI once per (fusion, safety) pair in-source, and for its held-out half once per
pair and held-out group. ``train.held_out_pairs`` scores that half only on the pairs with the
best in-source validation AUROC. This script runs the sweep on the pipeline's own store and
index (run ``dvc repro extract`` first) with ``held_out_pairs: 0`` (every pair, the baseline)
and with each shortlist size asked for, and prints the seconds, the ratio to the baseline and
whether the shortlist picks the same pair as the full sweep.

    python bench/sweep.py                        # shortlists of 6 (the default)
    python bench/sweep.py --shortlists 3 6 12

Writes ``bench/results/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.data.index import read_index
from pipeline.detect.heldout import load_eval_data, scoreable_groups
from pipeline.detect.provenance import open_store
from pipeline.detect.sweep import best_pair, sweep_pairs
from pipeline.layout import INDEX, STORE

RESULTS = Path("bench/results")


def main() -> None:
    """Time the full sweep and each shortlist on the store, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shortlists", type=int, nargs="+", default=[6], help="held_out_pairs values (> 0)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep.json")
    args = parser.parse_args()
    if any(n <= 0 for n in args.shortlists):
        parser.error("--shortlists: whole numbers > 0 (0, every pair, is the baseline and always runs)")
    params = load_params()
    data = load_eval_data(read_index(INDEX), open_store(params, STORE))
    groups = scoreable_groups(data.index, params.train.held_out_by)
    print(
        f"{len(data.index)} rows, layers {list(data.layers)}, {len(groups)} held-out "
        f"{params.train.held_out_by} groups, torch threads {torch.get_num_threads()}"
    )
    runs = []
    for count in [0, *args.shortlists]:
        config = replace(params.train, held_out_pairs=count)
        start = time.perf_counter()
        scores = sweep_pairs(data, config)
        seconds = time.perf_counter() - start
        best = best_pair(scores, config.select_by, config.select_tolerance)
        runs.append({"held_out_pairs": count, "seconds": seconds, "best": asdict(best)})
    base = runs[0]
    for run in runs:
        run["speedup"] = base["seconds"] / run["seconds"]
        run["same_pair_as_full"] = (run["best"]["fusion_layer"], run["best"]["safety_layer"]) == (
            base["best"]["fusion_layer"],
            base["best"]["safety_layer"],
        )
        label = "every pair" if run["held_out_pairs"] == 0 else f"best {run['held_out_pairs']} pairs"
        print(
            f"held-out half on {label:14s} {run['seconds']:8.1f} s  {run['speedup']:5.2f}x  "
            f"pair lf{run['best']['fusion_layer']}/ls{run['best']['safety_layer']} "
            f"held-out AUROC {run['best']['held_out_auroc']:.3f}  same as full: {run['same_pair_as_full']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": platform.machine(),
                "processor": platform.processor(),
                "torch_threads": torch.get_num_threads(),
                "rows": len(data.index),
                "layers": list(data.layers),
                "held_out_by": params.train.held_out_by,
                "groups": groups,
                "runs": runs,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
