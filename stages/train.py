"""DVC stage ``train``: the LSI projector and probe, from the activation store (no model needed).

The store is read through dask ``train.chunk_rows`` rows at a time, so a store larger than memory
trains. Layers set to ``best`` come from the ``sweep`` stage.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np

from pipeline.config import load_params
from pipeline.data.sources import read_index
from pipeline.detect.features import StoreFeatures
from pipeline.detect.probe import ProbeMeta, best_epoch, save_probe, train_probe
from pipeline.detect.store import ActivationStore
from pipeline.detect.sweep import resolve_layers
from pipeline.io import write_json_atomic
from pipeline.layout import INDEX, PROBE_DIR, STORE, SWEEP
from stages import run_stage

OUT = PROBE_DIR


def main() -> None:
    """Train on the train split, keep the best validation epoch, write weights and history."""
    params = load_params()
    cfg = params.train
    fusion_layer, safety_layer = resolve_layers(cfg.fusion_layer, cfg.safety_layer, cfg.select_by, SWEEP)
    cfg = replace(cfg, fusion_layer=fusion_layer, safety_layer=safety_layer)
    index = read_index(INDEX)
    store = ActivationStore.open(STORE)
    sources = {}
    for split in ("train", "val"):
        part = index.filter(index["split"] == split)
        sources[split] = StoreFeatures(
            store,
            part["row_id"].to_numpy(),
            part["label"].to_numpy().astype(np.int64),
            fusion_layer,
            safety_layer,
            chunk_rows=cfg.chunk_rows,
        )
    probe, history = train_probe(sources["train"], sources["val"], cfg)
    best = best_epoch(history)
    meta = ProbeMeta(
        hidden_size=int(probe.projector.in_features),
        alpha=cfg.alpha,
        fusion_layer=fusion_layer,
        safety_layer=safety_layer,
        best_epoch=best.epoch,
        best_val_auroc=best.val_auroc,
        store_provenance=store.provenance.to_json(),
    )
    save_probe(probe, meta, OUT)
    write_json_atomic(OUT / "history.json", [asdict(r) for r in history])
    write_json_atomic(
        OUT / "train_metrics.json",
        {
            "fusion_layer": fusion_layer,
            "safety_layer": safety_layer,
            "best_epoch": best.epoch,
            "best_val_auroc": best.val_auroc,
            "best_val_loss": best.val_loss,
            "n_train": len(sources["train"]),
            "n_val": len(sources["val"]),
            "options": {
                k: getattr(cfg, k) for k in ("lr", "standardize", "weight_decay", "class_weight", "chunk_rows")
            },
        },
    )
    print(
        f"layers fusion {fusion_layer} / safety {safety_layer}: best epoch {best.epoch}, "
        f"val AUROC {best.val_auroc:.3f} (train n={len(sources['train'])})"
    )


if __name__ == "__main__":
    run_stage(main)
