"""Training cost: LSI trained from the activation store against re-running the model every epoch, same run.

Store path (what the train stage does): the probe trains on features read from the Zarr store
through dask, ``--chunk-rows`` rows at a time.

Forward path (the procedure without a store): every epoch, every training request is run
through the model again (its benign and malicious prompts in a batch of two, full forward,
``output_hidden_states=True``) to get its features, then the probe takes its steps.

Both train the same probe with the same config on the same ``--rows`` training rows of the
default run's store for the same ``--epochs``. The one-time extraction of those rows is also
timed, so the ratio with extraction included is reported next to the training-only ratio.

    python bench/train.py --rows 32 --epochs 3

Needs the default pipeline's outputs (``dvc repro extract``). Prints a table and writes
``bench/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from extract import naive_states  # bench/extract.py: the seed's forward procedure

from pipeline.config import load_params
from pipeline.detect.detector import LSIDetector
from pipeline.detect.extraction import requests_from_index
from pipeline.detect.features import InMemoryFeatures, LSIFeatures, StoreFeatures, features_from_states
from pipeline.detect.store import ActivationStore
from pipeline.detect.sweep import resolve_layers
from pipeline.layout import INDEX, STORE, SWEEP
from pipeline.models.registry import load_adapter

RESULTS = Path("bench/results")


class ForwardEveryEpoch:
    """A feature source that runs the model for its rows on every read, as training without a store must."""

    def __init__(self, adapter: object, index_rows: object, prompts: object, lf: int, ls: int, chunk_rows: int):
        self.adapter, self.prompts = adapter, prompts
        self.requests = requests_from_index(index_rows)  # type: ignore[arg-type]
        self.labels = index_rows["label"].to_numpy().astype(np.int64)  # type: ignore[index]
        self.layers = sorted({lf, ls})
        self.lf, self.ls = lf, ls
        self.chunk_rows = chunk_rows
        self.forwards = 0

    def __len__(self) -> int:
        return len(self.requests)

    def chunk_bounds(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.chunk_rows, len(self))) for lo in range(0, len(self), self.chunk_rows)]

    def read(self, start: int, stop: int) -> LSIFeatures:
        states = naive_states(self.adapter, self.requests[start:stop], self.prompts, self.layers)  # type: ignore[arg-type]
        self.forwards += stop - start
        # naive_states returns (n, 2 framings, layers, hidden): benign, malicious, the store's first two.
        return features_from_states(states, self.layers, self.lf, self.ls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="training rows (from the train split)")
    parser.add_argument("--val-rows", type=int, default=16, help="validation rows (from the val split)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, help="rows per read, both paths (default: train.chunk_rows)")
    parser.add_argument("--out", type=Path, default=RESULTS / "train.json")
    args = parser.parse_args()

    from pipeline.data.index import read_index

    params = load_params()
    index = read_index(INDEX).sort("row_id")
    train_rows = index.filter(index["split"] == "train").head(args.rows)
    val_rows = index.filter(index["split"] == "val").head(args.val_rows)
    store = ActivationStore.open(STORE)
    train = params.train
    lf, ls = resolve_layers(train.fusion_layer, train.safety_layer, train.select_by, SWEEP, train.select_tolerance)
    args.chunk_rows = args.chunk_rows or params.train.chunk_rows
    config = replace(params.train, fusion_layer=lf, safety_layer=ls, epochs=args.epochs, chunk_rows=args.chunk_rows)

    def store_source(rows: object) -> StoreFeatures:
        return StoreFeatures(
            store=store,
            row_ids=rows["row_id"].to_numpy(),  # type: ignore[index]
            labels=rows["label"].to_numpy().astype(np.int64),  # type: ignore[index]
            fusion_layer=lf,
            safety_layer=ls,
            chunk_rows=args.chunk_rows,
        )

    def detector(epochs: int) -> LSIDetector:
        return LSIDetector.from_config(replace(config, epochs=epochs), lf, ls)

    # Warm-up outside the timings (imports, allocator, dask and optimiser first use), for both paths.
    detector(1).fit_sources(store_source(train_rows), store_source(val_rows))
    start = time.perf_counter()
    store_probe = detector(config.epochs).fit_sources(store_source(train_rows), store_source(val_rows)).probe_
    store_seconds = time.perf_counter() - start

    adapter = load_adapter(params.model)
    naive_states(adapter, requests_from_index(train_rows.head(1)), params.prompts, sorted({lf, ls}))  # type: ignore[arg-type]
    forward_train = ForwardEveryEpoch(adapter, train_rows, params.prompts, lf, ls, args.chunk_rows)
    # Validation features are computed once for the forward path: only training re-runs the model.
    val = InMemoryFeatures(
        ForwardEveryEpoch(adapter, val_rows, params.prompts, lf, ls, len(val_rows)).read(0, len(val_rows)),
        val_rows["label"].to_numpy().astype(np.int64),
        args.chunk_rows,
    )
    start = time.perf_counter()
    forward_probe = detector(config.epochs).fit_sources(forward_train, val).probe_
    forward_seconds = time.perf_counter() - start

    # What the store cost to fill for these rows, once: the extract stage's path.
    from pipeline.detect.features import states_for_requests

    start = time.perf_counter()
    states_for_requests(adapter, requests_from_index(train_rows), params.prompts, list(store.provenance.layers))
    extraction_seconds = time.perf_counter() - start

    # Same data: both paths' features agree, so both probes score the validation rows alike.
    agreement = float(
        np.corrcoef(store_probe.score(val.features), forward_probe.score(val.features))[0, 1] if len(val) > 1 else 1.0
    )
    result = {
        "model": adapter.info.name,  # type: ignore[attr-defined]
        "rows": len(train_rows),
        "epochs": args.epochs,
        "fusion_layer": lf,
        "safety_layer": ls,
        "store_seconds": store_seconds,
        "forward_seconds": forward_seconds,
        "forward_passes": forward_train.forwards,
        "one_time_extraction_seconds": extraction_seconds,
        "speedup_training": forward_seconds / store_seconds,
        "speedup_with_extraction": forward_seconds / (store_seconds + extraction_seconds),
        "probe_score_correlation": agreement,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(f"LSI training, {len(train_rows)} rows x {args.epochs} epochs, layers {lf}/{ls}, {adapter.info.name}")  # type: ignore[attr-defined]
    print(f"{'path':34s} {'seconds':>9s}")
    print(f"{'from the store':34s} {store_seconds:9.3f}")
    print(f"{'forward every example every epoch':34s} {forward_seconds:9.3f}")
    print(f"{'one-time extraction of these rows':34s} {extraction_seconds:9.3f}")
    print(
        f"store is {result['speedup_training']:.0f}x cheaper to train from "
        f"({result['speedup_with_extraction']:.1f}x counting its one-time extraction over {args.epochs} epochs)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
