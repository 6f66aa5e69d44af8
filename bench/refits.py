"""The held-out refits of ``evaluate`` (or the ``sweep`` stage's fits) in this process against
``cluster.address: auto``, in the same run.

``evaluate`` refits every detector once per held-out group (upstream, presentation, source): many
small logistic-regression and LSI fits. This script runs one grouping's refits on the pipeline's
own store, index, shipped detector and tau (run ``dvc repro evaluate`` first), in this process
(``cluster.address: ""``, torch and BLAS on every core: the baseline) and on what ``auto``
resolves to here (``local:<cores>``, one single-threaded worker per core), in ``--rounds``
interleaved rounds, and prints each path's fastest round, the speed-up, the CPU seconds this
process and its workers spent, and how far the results are from the baseline's: whether the
scores are bit for bit the same, the largest score gap and the largest gap in any metric (AUROC,
TPR, the share flagged: thread counts round the fits differently, which can swap near-tied rows).

``--stage sweep`` does the same for the sweep stage's fits (run ``dvc repro extract`` first): the
layer pairs in-source and held out, then every detector on each held-out group at the chosen pair.
It reports the largest pair and detector AUROC gaps and whether both paths choose the same pair
and shipped detector. ``--stage detectors`` times the detectors alone, at the pair the run's sweep
chose (run ``dvc repro sweep`` first).

    python bench/refits.py                      # the upstream grouping (train.held_out_by), 1 round
    python bench/refits.py --by presentation --rounds 2
    python bench/refits.py --stage sweep --rounds 2
    python bench/refits.py --stage detectors --rounds 3

Writes ``bench/results/refits.json`` (the other stages: ``refits_<stage>.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from pipeline.config import HELD_OUT_BY, LAYER_CHOICE, ClusterConfig, Params, load_params
from pipeline.data.index import read_index
from pipeline.detect.calibration import load_calibration
from pipeline.detect.cluster_open import open_cluster, resolve_cluster
from pipeline.detect.cores import available_cores
from pipeline.detect.heldout import EvalData, load_eval_data, scoreable_groups
from pipeline.detect.provenance import open_store
from pipeline.detect.shipped import load_detector
from pipeline.detect.store import ActivationStore
from pipeline.detect.sweep import (
    DetectorScore,
    SweepResult,
    choose_detector,
    resolve_layers,
    score_detectors,
    sweep,
)
from pipeline.evaluate.detection import HeldOutResults, held_out_results
from pipeline.evaluate.intervals import BootstrapSpec
from pipeline.evaluate.refusal_direction import readout_from_adapter, store_refusal_scores
from pipeline.layout import CALIBRATION, INDEX, PROBE_DIR, STORE, SWEEP
from pipeline.models.registry import load_adapter

RESULTS = Path("bench/results")
# Compares the in-process result (first) with the cluster's (second): JSON-ready figures.
Compare = Callable[[Any, Any], dict[str, Any]]


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


def sweep_differences(a: SweepResult, b: SweepResult, tolerance: float) -> dict[str, Any]:
    """How far sweep ``b`` is from ``a``: bit-identical or not, the largest pair and detector AUROC gaps,
    and whether both choose the same pair and (by ``guard.detector: best`` at ``tolerance``) detector."""
    if [(p.fusion_layer, p.safety_layer) for p in a.pairs] != [(p.fusion_layer, p.safety_layer) for p in b.pairs]:
        raise ValueError("the two sweeps scored different layer pairs")
    pair_gaps = [
        abs(getattr(p, key) - getattr(q, key))
        for p, q in zip(a.pairs, b.pairs, strict=True)
        for key in ("val_auroc", "held_out_auroc")
        if not np.isnan(getattr(p, key) - getattr(q, key))
    ]
    return {
        **detector_differences(a.detectors, b.detectors, tolerance),
        "identical_scores": repr(a) == repr(b),  # repr: every float to the last bit, NaN equal to NaN
        "max_pair_gap": max(pair_gaps, default=0.0),
        "same_pair": (a.best.fusion_layer, a.best.safety_layer) == (b.best.fusion_layer, b.best.safety_layer),
        "pair": f"fusion {b.best.fusion_layer}, safety {b.best.safety_layer}",
    }


def detector_differences(a: list[DetectorScore], b: list[DetectorScore], tolerance: float) -> dict[str, Any]:
    """How far detector scores ``b`` are from ``a``: bit-identical or not, the largest AUROC gap per
    detector, ``b``'s mean per detector, and whether both ship the same detector (``guard.detector:
    best`` at ``tolerance``)."""
    if [(d.name, list(d.per_group)) for d in a] != [(d.name, list(d.per_group)) for d in b]:
        raise ValueError("the two sweeps scored different detectors or groups")
    gaps = {d.name: _largest_gap(d.per_group, e.per_group) for d, e in zip(a, b, strict=True)}
    chosen = [choose_detector(scores, "best", tolerance).name for scores in (a, b)]
    return {
        "identical_scores": repr(a) == repr(b),
        "max_detector_gap": max(gaps.values(), default=0.0),
        "max_detector_gap_by_detector": gaps,
        "mean_auroc_by_detector": {d.name: d.held_out_auroc for d in b},
        "same_detector": chosen[0] == chosen[1],
        "detector": chosen[1],
    }


def _largest_gap(a: dict[str, float], b: dict[str, float]) -> float:
    """The largest gap between two groups-to-AUROC maps' values (NaN on either side skipped)."""
    return max((abs(v - b[g]) for g, v in a.items() if not np.isnan(v - b[g])), default=0.0)


@dataclass(frozen=True)
class StagePaths:
    """One stage's fits both ways: what they run on (``about``, ``rows`` of the index), each path, the comparison."""

    about: str
    rows: int
    paths: dict[str, Callable[[], Any]]
    compare: Compare


def evaluate_paths(params: Params, by: str, auto: ClusterConfig) -> StagePaths:
    """``evaluate``'s held-out refits for grouping ``by``, in process and on ``auto``'s cluster."""
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
    common = (params.train, params.calibrate, meta.fusion_layer, meta.safety_layer, groups, (shipped.name, tau))

    def in_process() -> HeldOutResults:
        return held_out_results(data, *common, bootstrap, by)

    def on_cluster() -> HeldOutResults:
        from pipeline.evaluate.cluster_refits import held_out_results_on_cluster  # needs the 'cluster' extra

        with open_cluster(auto) as client:
            assert client is not None
            return held_out_results_on_cluster(client, store, index, refusal, *common, bootstrap, by)

    about = f"{len(index)} rows, {len(groups)} held-out {by} groups, shipped {shipped.name} (tau {tau:.4f})"
    return StagePaths(about, len(index), {"in process": in_process, f"auto ({auto.address})": on_cluster}, differences)


def sweep_paths(params: Params, auto: ClusterConfig) -> StagePaths:
    """The sweep stage's fits (the pairs' two halves, then the detectors), in process and on ``auto``'s cluster."""
    index, store, data = _store_states(params)

    def on_cluster() -> SweepResult:
        from pipeline.detect.cluster_sweep import sweep_on_cluster  # needs the 'cluster' extra

        with open_cluster(auto) as client:
            assert client is not None
            return sweep_on_cluster(client, store, index, params.train, progress=False)

    paths: dict[str, Callable[[], Any]] = {
        "in process": lambda: sweep(data, params.train, progress=False),
        f"auto ({auto.address})": on_cluster,
    }
    groups = scoreable_groups(index, params.train.held_out_by)
    about = f"{len(index)} rows, layers {list(data.layers)}, {len(groups)} held-out {params.train.held_out_by} groups"
    return StagePaths(about, len(index), paths, lambda a, b: sweep_differences(a, b, params.train.select_tolerance))


def detector_paths(params: Params, auto: ClusterConfig) -> StagePaths:
    """The sweep stage's detector scores alone, at the pair the run's sweep chose, in process and on ``auto``'s
    cluster (whose path includes the workers reading the store)."""
    index, store, data = _store_states(params)
    train = params.train
    lf, ls = resolve_layers(LAYER_CHOICE, LAYER_CHOICE, train.select_by, SWEEP, train.select_tolerance)

    def on_cluster() -> list[DetectorScore]:
        from pipeline.detect.cluster_sweep import score_detectors_on_cluster  # needs the 'cluster' extra

        with open_cluster(auto) as client:
            assert client is not None
            return score_detectors_on_cluster(client, store, index, params.train, lf, ls, progress=False)

    paths: dict[str, Callable[[], Any]] = {
        "in process": lambda: score_detectors(data, params.train, lf, ls, progress=False),
        f"auto ({auto.address})": on_cluster,
    }
    groups = scoreable_groups(index, params.train.held_out_by)
    about = f"{len(index)} rows, fusion {lf} / safety {ls}, {len(groups)} held-out {params.train.held_out_by} groups"
    return StagePaths(about, len(index), paths, lambda a, b: detector_differences(a, b, params.train.select_tolerance))


def _store_states(params: Params) -> tuple[pl.DataFrame, ActivationStore, EvalData]:
    """The run's index, its checked store and every index row's states (what both sweep paths start from)."""
    index = read_index(INDEX)
    store = open_store(params, STORE)
    return index, store, load_eval_data(index, store)


def main() -> None:
    """Time one stage's fits both ways, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("evaluate", "sweep", "detectors"), default="evaluate")
    parser.add_argument("--by", choices=HELD_OUT_BY, help="evaluate's held-out grouping (default: train.held_out_by)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, help="default: bench/results/refits.json (others: refits_<stage>.json)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    params = load_params()
    by = args.by or params.train.held_out_by
    auto = resolve_cluster(replace(params.cluster, address="auto"), with_model=False)
    if not auto.address:
        raise SystemExit(f"cluster.address auto runs in process here ({available_cores()} core(s)): nothing to compare")
    if args.stage == "sweep":
        stage = sweep_paths(params, auto)
    elif args.stage == "detectors":
        stage = detector_paths(params, auto)
    else:
        stage = evaluate_paths(params, by, auto)
    about, paths, compare = stage.about, stage.paths, stage.compare
    print(f"{args.stage}: {about}; in process (torch threads {torch.get_num_threads()}) against auto = {auto.address}")
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    results: dict[str, Any] = {}
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
            **compare(results[base_name], results[name]),
            "rounds": rounds[name],
        }
        rows.append(row)
        print(
            f"{name:18s} {row['seconds']:7.1f} s  {row['speedup']:5.2f}x  CPU {row['cpu_seconds']:7.1f} s  "
            f"identical to in process: {row['identical_scores']}"
        )
        gaps = {k: v for k, v in row.items() if k.startswith(("max_", "same_", "pair", "detector"))}
        gaps = {k: v for k, v in gaps.items() if not isinstance(v, dict)}
        print("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in gaps.items()))
        by_detector = row.get("max_score_gap_by_detector") or row.get("max_detector_gap_by_detector") or {}
        print("  largest gap per detector: " + ", ".join(f"{d} {gap:.2g}" for d, gap in by_detector.items()))
        if means := row.get("mean_auroc_by_detector"):
            print("  mean held-out AUROC per detector: " + ", ".join(f"{d} {m:.3f}" for d, m in means.items()))
    out = args.out or RESULTS / ("refits.json" if args.stage == "evaluate" else f"refits_{args.stage}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "stage": args.stage,
        "rows": stage.rows,
        "held_out_by": by if args.stage == "evaluate" else params.train.held_out_by,
        "paths": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
