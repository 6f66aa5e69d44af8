"""LSI training time with Adam's fused kernel against torch's per-tensor loop, interleaved in one run.

Every layer-sweep pair and every held-out refit trains LSI, so a step's cost is what the sweep and
``evaluate`` stages pay over and over. On the default run a step sees 16 rows and updates a
hidden x hidden projector, so the optimiser's update weighs as much as the forward and backward.
This script trains the same probe (the run's pair from ``data/sweep/sweep.json``, or
``--pair``) on the in-source train split, its epoch chosen on the val split, both ways, in
``--rounds`` rounds whose order rotates, and reports each way's seconds, the median ratio
(with its range) and each way's validation AUROC. The two are the same update rounded in
another order, so their weights drift apart over the steps; the AUROCs show whether that matters.

    python bench/optimiser.py              # 3 rounds at the sweep's pair
    python bench/optimiser.py --pair 18 12 --rounds 5

Needs the default pipeline's store (``dvc repro sweep``). Prints a table and writes
``bench/results/optimiser.json``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from prefix_reuse import rotated, spread  # bench/prefix_reuse.py: the interleaved rounds' order and spread

from pipeline.config import load_params
from pipeline.data.index import read_index
from pipeline.detect.features import InMemoryFeatures
from pipeline.detect.heldout import EvalData, in_source_setting, load_eval_data
from pipeline.detect.probe import auroc_or_nan, train_probe
from pipeline.detect.provenance import open_store
from pipeline.detect.sweep import resolve_layers
from pipeline.io import write_json_atomic
from pipeline.layout import INDEX, STORE, SWEEP

RESULTS = Path("bench/results")
WAYS = {"fused": True, "per-tensor loop": False}


def sources(data: EvalData, rows: np.ndarray, lf: int, ls: int) -> InMemoryFeatures:
    """The LSI features and labels of ``rows`` as a training source."""
    return InMemoryFeatures(data.lsi(rows, lf, ls), data.labels[rows])


def main() -> None:
    """Time both optimisers, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", type=int, nargs=2, metavar=("FUSION", "SAFETY"), help="default: the sweep's pair")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both ways, order rotating (>= 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "optimiser.json")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: a whole number >= 1")
    params = load_params()
    data = load_eval_data(read_index(INDEX), open_store(params, STORE))
    lf, ls = args.pair or resolve_layers("best", "best", params.train.select_by, SWEEP, params.train.select_tolerance)
    inside = in_source_setting(data.index)
    train, val = sources(data, inside.train, lf, ls), sources(data, inside.val, lf, ls)
    print(
        f"LSI at fusion {lf} / safety {ls}: {len(train)} training rows, {len(val)} validation rows, "
        f"width {train.features.h_s.shape[1]}, {params.train.epochs} epochs of batch {params.train.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    aurocs: dict[str, float] = {}
    for round_ in range(args.rounds):
        for way in rotated(list(WAYS), round_):
            start = time.perf_counter()
            probe, _ = train_probe(train, val, params.train, progress=False, fused=WAYS[way])
            seconds[way].append(time.perf_counter() - start)
            aurocs[way] = auroc_or_nan(val.labels, probe.score(val.features))
        print(f"round {round_ + 1}: " + ", ".join(f"{way} {seconds[way][-1]:.2f} s" for way in WAYS))
    ratios = [loop / fused for fused, loop in zip(seconds["fused"], seconds["per-tensor loop"], strict=True)]
    summary = spread(ratios)
    for way in WAYS:
        print(f"{way:16s} median {statistics.median(seconds[way]):6.2f} s  validation AUROC {aurocs[way]:.4f}")
    print(f"fused / per-tensor loop: {summary['median']:.2f}x ({summary['min']:.2f}-{summary['max']:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": platform.machine(), "processor": platform.processor()}
    record |= {"torch_threads": torch.get_num_threads(), "pair": [lf, ls], "epochs": params.train.epochs}
    record |= {"train_rows": len(train), "val_rows": len(val), "seconds": seconds, "val_auroc": aurocs}
    write_json_atomic(args.out, record | {"speedup": summary})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
