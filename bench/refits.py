"""The held-out refits of ``evaluate`` in this process against ``cluster.address: auto``, in the same run.

``evaluate`` refits every detector once per held-out group (upstream, presentation, source): many
small logistic-regression and LSI fits. This script runs one grouping's refits on the pipeline's
own store, index, shipped detector and tau (run ``dvc repro evaluate`` first), in this process
(``cluster.address: ""``, torch and BLAS on every core: the baseline) and on what ``auto``
resolves to here (``local:<cores>``, one single-threaded worker per core), in ``--rounds``
interleaved rounds, and prints each path's fastest round, the speed-up, the CPU seconds this
process and its workers spent, and how far the results are from the baseline's: whether the
scores are bit for bit the same, the largest score gap and the largest gap in any metric (AUROC,
TPR, the share flagged: thread counts round the fits differently, which can swap near-tied rows).

    python bench/refits.py                      # the upstream grouping (train.held_out_by), 1 round
    python bench/refits.py --by presentation --rounds 2

Writes ``bench/results/refits.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import HELD_OUT_BY, load_params
from pipeline.data.index import read_index
from pipeline.detect.calibration import load_calibration
from pipeline.detect.cluster_open import open_cluster, resolve_cluster
from pipeline.detect.cores import available_cores
from pipeline.detect.heldout import load_eval_data, scoreable_groups
from pipeline.detect.provenance import open_store
from pipeline.detect.shipped import load_detector
from pipeline.evaluate.detection import HeldOutResults, held_out_results
from pipeline.evaluate.intervals import BootstrapSpec
from pipeline.evaluate.refusal_direction import readout_from_adapter, store_refusal_scores
from pipeline.layout import CALIBRATION, INDEX, PROBE_DIR, STORE
from pipeline.models.registry import load_adapter

RESULTS = Path("bench/results")


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (the workers, once stopped)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def numbers(tree: object, path: str = "") -> dict[str, float]:
    """Every number in a nested dict of metrics, by its path."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{path}/{key}").items()}
    return {path: float(tree)} if isinstance(tree, int | float) and not isinstance(tree, bool) else {}


def differences(a: HeldOutResults, b: HeldOutResults) -> dict[str, Any]:
    """How far ``b`` is from ``a``: bit-identical scores or not, the largest score and metric gaps."""
    if a.scores.keys() != b.scores.keys() or any(a.scores[g].keys() != b.scores[g].keys() for g in a.scores):
        raise ValueError("the two paths scored different groups or detectors")
    detectors = sorted({d for g in a.scores for d in a.scores[g]})
    score_gaps = {
        d: max(float(np.abs(a.scores[g][d] - b.scores[g][d]).max(initial=0.0)) for g in a.scores if d in a.scores[g])
        for d in detectors
    }
    left, right = numbers(a.metrics), numbers(b.metrics)
    metric_gaps = {k: abs(left[k] - right[k]) for k in left if k in right and not np.isnan(left[k] - right[k])}
    auroc_gaps = [gap for k, gap in metric_gaps.items() if k.endswith("/auroc")]
    return {
        "identical_scores": all(gap == 0.0 for gap in score_gaps.values()),
        "max_score_gap": max(score_gaps.values(), default=0.0),
        "max_score_gap_by_detector": score_gaps,
        "max_auroc_gap": max(auroc_gaps, default=0.0),
        "max_metric_gap": max(metric_gaps.values(), default=0.0),
        "max_metric_gap_at": max(metric_gaps, key=metric_gaps.__getitem__, default=""),
    }


def main() -> None:
    """Time one grouping's refits both ways, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--by", choices=HELD_OUT_BY, help="held-out grouping (default: train.held_out_by)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "refits.json")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    params = load_params()
    by = args.by or params.train.held_out_by
    shipped, meta = load_detector(PROBE_DIR)
    tau = load_calibration(CALIBRATION).tau
    index = read_index(INDEX)
    store = open_store(params, STORE)
    # The refusal-direction baseline's scores, as the evaluate stage computes them.
    readout = readout_from_adapter(load_adapter(params.model), params.evaluate.refusal_words)
    refusal = store_refusal_scores(store, readout, list(params.evaluate.refusal_layers))
    data = load_eval_data(index, store, refusal)
    groups = scoreable_groups(index, by, split="test")
    bootstrap = BootstrapSpec(params.evaluate.bootstrap_resamples, params.evaluate.confidence, seed=params.train.seed)
    auto = resolve_cluster(replace(params.cluster, address="auto"), with_model=False)
    if not auto.address:
        raise SystemExit(f"cluster.address auto runs in process here ({available_cores()} core(s)): nothing to compare")
    print(
        f"{len(index)} rows, {len(groups)} held-out {by} groups, shipped {shipped.name} (tau {tau:.4f}); "
        f"in process (torch threads {torch.get_num_threads()}) against auto = {auto.address}"
    )
    common = (params.train, params.calibrate, meta.fusion_layer, meta.safety_layer, groups, (shipped.name, tau))

    def in_process() -> HeldOutResults:
        return held_out_results(data, *common, bootstrap, by)

    def on_cluster() -> HeldOutResults:
        from pipeline.evaluate.cluster_refits import held_out_results_on_cluster  # needs the 'cluster' extra

        with open_cluster(auto) as client:
            assert client is not None
            return held_out_results_on_cluster(client, store, index, refusal, *common, bootstrap, by)

    paths: dict[str, Callable[[], HeldOutResults]] = {"in process": in_process, f"auto ({auto.address})": on_cluster}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    results: dict[str, HeldOutResults] = {}
    for _ in range(args.rounds):
        for name, run in paths.items():
            cpu, start = cpu_seconds(), time.perf_counter()
            results[name] = run()
            rounds[name].append({"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu})
    base_name = next(iter(paths))
    base = min(r["seconds"] for r in rounds[base_name])
    rows = []
    for name in paths:
        fastest = min(rounds[name], key=lambda r: r["seconds"])
        row = {
            "path": name,
            "seconds": fastest["seconds"],
            "cpu_seconds": fastest["cpu_seconds"],
            "speedup": base / fastest["seconds"],
            **differences(results[base_name], results[name]),
            "rounds": rounds[name],
        }
        rows.append(row)
        print(
            f"{name:18s} {row['seconds']:7.1f} s  {row['speedup']:5.2f}x  CPU {row['cpu_seconds']:7.1f} s  "
            f"scores identical to in process: {row['identical_scores']} (largest gap "
            f"{row['max_score_gap']:.2g}; largest AUROC gap {row['max_auroc_gap']:.3f}, largest metric gap "
            f"{row['max_metric_gap']:.3f} at {row['max_metric_gap_at'] or '-'})"
        )
        print(
            "  largest score gap per detector: "
            + ", ".join(f"{d} {gap:.2g}" for d, gap in row["max_score_gap_by_detector"].items())
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "rows": len(index),
        "held_out_by": by,
        "groups": groups,
        "paths": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
