"""Scaling on a Dask cluster: extraction and the layer sweep in process, then on 1 and 2 local workers.

The in-process path (``cluster.address: ""``) is the baseline, measured in the same run. For
each worker count the table gives the time, the speed-up over the baseline, the scaling
efficiency (speed-up / workers) and whether the result equals the baseline's bit for bit. At 1
worker the speed-up's inverse is the cluster path's overhead. Starting the cluster (spawning the
workers, their imports) is timed apart: it is paid once per stage, whatever the work.

- Extraction: the default model (SmolLM2-135M) on ``--requests`` text-only demo requests
  (``data/demo/requests.jsonl``, no OCR), ``--shard-rows`` rows per shard. Each path's time
  includes loading the model (in process: once; on the cluster: once per worker).
- Sweep: a synthetic store shaped like the default run's (``--layers`` stored layers, so
  layers^2 pairs; ``--hidden`` wide; ``--sources`` sources of ``--rows-per-source`` rows), every
  pair trained in-source and once per held-out source, ``--epochs`` epochs. Each path's time
  includes reading the store (in process: once; on the cluster: once per worker).

The in-process path runs torch on every core, as it does without ``OMP_NUM_THREADS``; each of N
workers gets cores / N threads. Every path first does a small untimed warm-up of both workloads
(imports, first forward, first training step in each process). The machine may be shared: the
paths run in ``--rounds`` interleaved rounds, so a stretch of load from other jobs slows all of
them alike, and each path's fastest round counts (every round's time is in the JSON).

    python bench/scale.py
    python bench/scale.py --requests 96 --layers 8 --epochs 15 --rounds 3

Prints a table and writes ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from threadpoolctl import threadpool_limits

from pipeline.config import ClusterConfig, ExtractConfig, Params, TrainConfig, load_params
from pipeline.detect.cluster import cluster_client
from pipeline.detect.cluster_extraction import extract_on_cluster, model_loader
from pipeline.detect.cluster_sweep import sweep_pairs_on_cluster
from pipeline.detect.cores import available_cores
from pipeline.detect.extraction import extract_to_store
from pipeline.detect.heldout import load_eval_data
from pipeline.detect.store import ActivationStore
from pipeline.detect.store_schema import Provenance
from pipeline.detect.sweep import sweep_pairs
from pipeline.models.registry import load_adapter

RESULTS = Path("bench/results")
DEMO_REQUESTS = Path("data/demo/requests.jsonl")
SPLITS = ("train", "val", "calib", "test")


def demo_index(requests: int) -> pl.DataFrame:
    """The first ``requests`` text-only demo requests as an index (``row_id``, ``text``, ``image_path``)."""
    rows = [json.loads(line) for line in DEMO_REQUESTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [row["text"] for row in rows if row.get("image") is None][:requests]
    if len(texts) < requests:
        raise SystemExit(f"{DEMO_REQUESTS}: only {len(texts)} text-only requests, asked for {requests}")
    return pl.DataFrame(
        {"row_id": list(range(requests)), "text": texts, "image_path": [None] * requests},
        schema={"row_id": pl.Int64, "text": pl.String, "image_path": pl.String},
    )


def synthetic_store(
    path: Path, num_layers: int, sources: int, rows_per_source: int, hidden: int
) -> tuple[ActivationStore, pl.DataFrame]:
    """A finished store of random states with a weak label signal, and its index (sources, splits, labels)."""
    rng = np.random.default_rng(0)
    layers = tuple(range(3, 3 + 3 * num_layers, 3))
    n = sources * rows_per_source
    labels = np.arange(n) % 2
    index = pl.DataFrame(
        {
            "row_id": np.arange(n),
            "source": [f"source-{i // rows_per_source}" for i in range(n)],
            "split": [SPLITS[(i // 2) % 4] for i in range(n)],
            "label": labels,
            "text": [f"request {i}" for i in range(n)],
            "category": ["c"] * n,
        }
    )
    states = rng.normal(size=(n, 3, len(layers), hidden)).astype(np.float32)
    states[:, 1, :, :8] += 0.5 * labels[:, None, None]  # the malicious framing moves on harmful rows
    provenance = Provenance(
        model_name="synthetic",
        model_revision="0",
        model_dtype="float32",
        template_benign="b {q}",
        template_malicious="m {q}",
        variants=("benign", "malicious", "plain"),
        layers=layers,
        hidden_size=hidden,
    )
    store = ActivationStore.create(path, index["row_id"].to_list(), provenance, 256)
    for start, end in store.shard_blocks():
        store.write_block(start, states[start:end])
    store.mark_complete()
    return ActivationStore.open(store.path), index


def timed(work: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Seconds ``work(*args, **kwargs)`` took, and what it returned."""
    start = time.perf_counter()
    result = work(*args, **kwargs)
    return time.perf_counter() - start, result


def store_bytes(path: Path) -> bytes:
    """A store's states, as stored."""
    return np.asarray(ActivationStore.open(path).group["states"][:]).tobytes()


@dataclass
class Workloads:
    """Both workloads' inputs, their warm-up versions, and the in-process results the cluster's must equal."""

    params: Params
    requests: pl.DataFrame
    extract: ExtractConfig
    store: ActivationStore
    index: pl.DataFrame
    train: TrainConfig
    warm_requests: pl.DataFrame
    warm_store: ActivationStore
    warm_index: pl.DataFrame
    work: Path
    baseline_store: bytes = b""
    baseline_scores: str = ""


def in_process_round(w: Workloads, cores: int, round_no: int) -> dict[str, tuple[float, bool]]:
    """Both workloads in this process on every core: seconds, and whether the result equals the first round's."""
    prompts, model = w.params.prompts, w.params.model
    tokens = w.params.limits.max_request_tokens
    torch.set_num_threads(cores)
    with threadpool_limits(limits=cores):
        # Warm-up, untimed: imports, first forward and first training step.
        warm = load_adapter(model, tokens)
        extract_to_store(warm, w.warm_requests, prompts, w.extract, w.work / f"warm-in-{round_no}.zarr", progress=False)
        sweep_pairs(load_eval_data(w.warm_index, w.warm_store), replace(w.train, epochs=1), progress=False)

        path = w.work / f"in-process-{round_no}.zarr"

        def extract_in_process() -> None:
            extract_to_store(load_adapter(model, tokens), w.requests, prompts, w.extract, path, progress=False)

        extract_seconds, _ = timed(extract_in_process)
        sweep_seconds, scores = timed(lambda: sweep_pairs(load_eval_data(w.index, w.store), w.train, progress=False))
    if not w.baseline_store:
        w.baseline_store, w.baseline_scores = store_bytes(path), repr(scores)
    return {
        "extract": (extract_seconds, store_bytes(path) == w.baseline_store),
        "sweep": (sweep_seconds, repr(scores) == w.baseline_scores),
    }


def cluster_round(w: Workloads, workers: int, round_no: int) -> dict[str, tuple[float, bool]]:
    """Both workloads on a fresh ``local:workers`` cluster: seconds, and whether each equals the in-process result."""
    prompts = w.params.prompts
    load = model_loader(w.params.model, w.params.limits.max_request_tokens)
    start = time.perf_counter()
    with cluster_client(ClusterConfig(address=f"local:{workers}", connect_timeout_s=300)) as client:
        assert client is not None
        started = time.perf_counter() - start
        # Warm-up, untimed, in every worker: imports, first forward and first training step.
        warm_path = w.work / f"warm-{workers}-{round_no}.zarr"
        extract_on_cluster(client, load, w.warm_requests, prompts, w.extract, warm_path, progress=False)
        sweep_pairs_on_cluster(client, w.warm_store, w.warm_index, replace(w.train, epochs=1), progress=False)
        path = w.work / f"cluster-{workers}-{round_no}.zarr"
        extract_seconds, _ = timed(
            extract_on_cluster, client, load, w.requests, prompts, w.extract, path, progress=False
        )
        sweep_seconds, scores = timed(sweep_pairs_on_cluster, client, w.store, w.index, w.train, progress=False)
    return {
        "extract": (extract_seconds, store_bytes(path) == w.baseline_store),
        "sweep": (sweep_seconds, repr(scores) == w.baseline_scores),
        "start": (started, True),
    }


def main() -> None:
    """Rounds of: both workloads in process, then on 1 and 2 workers; the fastest of each; table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--shard-rows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--rows-per-source", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="the fastest round counts (the machine is shared)")
    args = parser.parse_args()

    params = load_params()
    cores = available_cores()
    work = Path(tempfile.mkdtemp(prefix="lsi-scale-"))
    requests = demo_index(args.requests)
    store, index = synthetic_store(work / "sweep.zarr", args.layers, args.sources, args.rows_per_source, args.hidden)
    warm_store, warm_index = synthetic_store(work / "warm.zarr", 1, args.sources, 40, args.hidden)
    w = Workloads(
        params=params,
        requests=requests,
        extract=replace(params.extract, batch_size=args.batch_size, shard_rows=args.shard_rows),
        store=store,
        index=index,
        train=replace(TrainConfig(), epochs=args.epochs),
        warm_requests=requests.head(args.shard_rows),
        warm_store=warm_store,
        warm_index=warm_index,
        work=work,
    )
    # Interleaved, so a stretch of heavy load from other jobs slows every path alike.
    samples: dict[tuple[str, int], list[tuple[float, bool]]] = {}
    loads: list[float] = []  # the machine's 1-minute load average after each path: other jobs show here
    for round_no in range(args.rounds):
        for workers in [0, *args.workers]:
            found = in_process_round(w, cores, round_no) if workers == 0 else cluster_round(w, workers, round_no)
            for workload, sample in found.items():
                samples.setdefault((workload, workers), []).append(sample)
            loads.append(os.getloadavg()[0])
            print(
                f"round {round_no + 1}, {workers or 'in-process'}: "
                + ", ".join(f"{k} {v[0]:.2f} s" for k, v in found.items()),
                flush=True,
            )

    rows: list[dict[str, Any]] = []
    for (workload, workers), found in samples.items():
        if workload == "start":
            continue
        seconds = [s for s, _ in found]
        row = {
            "workload": workload,
            "path": "cluster" if workers else "in process",
            "workers": workers,
            "seconds": min(seconds),
            "all_seconds": seconds,
            "equal": all(equal for _, equal in found),
        }
        if workers:
            row["cluster_start_s"] = min(s for s, _ in samples[("start", workers)])
        rows.append(row)
    baseline = {row["workload"]: row["seconds"] for row in rows if row["workers"] == 0}
    for row in rows:
        row["speedup"] = baseline[row["workload"]] / row["seconds"]
        row["efficiency"] = row["speedup"] / max(1, row["workers"])
    overhead = {
        row["workload"]: row["seconds"] / baseline[row["workload"]] - 1.0 for row in rows if row["workers"] == 1
    }
    rows.sort(key=lambda row: (row["workload"], row["workers"]))

    print(
        f"{cores} cores; extract: {args.requests} requests, shards of {args.shard_rows}; sweep: {args.layers} layers"
        f" ({args.layers**2} pairs), {args.sources} sources x {args.rows_per_source} rows, hidden {args.hidden},"
        f" {args.epochs} epochs; fastest of {args.rounds} rounds"
    )
    print(
        f"{'workload':8s} {'path':10s} {'workers':>7s} {'seconds':>8s} {'speed-up':>8s} {'effic.':>6s}"
        f" {'start s':>7s} {'equal':>5s}"
    )
    for row in rows:
        start_s = f"{row['cluster_start_s']:7.1f}" if "cluster_start_s" in row else f"{'':7s}"
        print(
            f"{row['workload']:8s} {row['path']:10s} {row['workers']:7d} {row['seconds']:8.2f} {row['speedup']:7.2f}x"
            f" {row['efficiency']:6.2f} {start_s} {str(row['equal']):>5s}"
        )
    for workload, value in overhead.items():
        print(f"cluster path overhead at 1 worker, {workload}: {100 * value:+.1f}%")
    print(f"1-minute load average after each path: {', '.join(f'{load:.1f}' for load in loads)}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"cores": cores, "platform": platform.platform(), "torch": torch.__version__},
        "args": vars(args),
        "rows": rows,
        "overhead_at_1_worker": overhead,
        "load_average_after_each_path": loads,
    }
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work)
    print(f"wrote {RESULTS / 'scale.json'}")


if __name__ == "__main__":
    main()
