"""DVC stage ``train``: the LSI projector and probe, from the activation store (no model needed)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.config import load_params
from pipeline.features import aligned_features
from pipeline.probe import ProbeMeta, best_epoch, save_probe, train_probe
from pipeline.store import ActivationStore
from stages.common import INDEX, STORE, run_stage, write_json_atomic

OUT = Path("data/probe")


def main() -> None:
    """Train on the train split, keep the best validation epoch, write weights and history."""
    from pipeline.dataset import read_index

    params = load_params()
    cfg = params.train
    index = read_index(INDEX)
    store = ActivationStore.open(STORE)
    splits = {}
    for split in ("train", "val"):
        part = index.filter(index["split"] == split)
        features = aligned_features(store, part["row_id"].to_numpy(), cfg.fusion_layer, cfg.safety_layer)
        splits[split] = (features, part["label"].to_numpy().astype(np.int64))
    probe, history = train_probe(*splits["train"], *splits["val"], cfg)
    best = best_epoch(history)
    meta = ProbeMeta(
        hidden_size=int(splits["train"][0].h_s.shape[1]),
        alpha=cfg.alpha,
        fusion_layer=cfg.fusion_layer,
        safety_layer=cfg.safety_layer,
        best_epoch=best.epoch,
        best_val_auroc=best.val_auroc,
        store_provenance=store.provenance.to_json(),
    )
    save_probe(probe, meta, OUT)
    (OUT / "history.json").write_text(json.dumps([asdict(r) for r in history], indent=2))
    write_json_atomic(
        OUT / "train_metrics.json",
        {
            "best_epoch": best.epoch,
            "best_val_auroc": best.val_auroc,
            "best_val_loss": best.val_loss,
            "n_train": len(splits["train"][1]),
            "n_val": len(splits["val"][1]),
        },
    )
    print(f"best epoch {best.epoch}: val AUROC {best.val_auroc:.3f} (train n={len(splits['train'][1])})")


if __name__ == "__main__":
    run_stage(main)
