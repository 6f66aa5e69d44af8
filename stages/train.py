"""DVC stage ``train``: the shipped detector, from the activation store (no model needed).

``guard.detector: lsi`` trains the LSI projector and probe; ``best`` trains whichever detector
the sweep stage found to transfer best to held-out upstreams (LSI or a linear probe on its states).
LSI reads the store through dask ``train.chunk_rows`` rows at a time, so a store larger than
memory trains. Layers set to ``best`` come from the ``sweep`` stage.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np

from pipeline.config import TrainConfig, load_params
from pipeline.data.index import read_index
from pipeline.detect.detector import LSI, LinearDetector, LSIDetector
from pipeline.detect.features import StoreFeatures
from pipeline.detect.heldout import fit_detector, in_source_setting, load_eval_data
from pipeline.detect.probe import ProbeMeta, auroc_or_nan, best_epoch
from pipeline.detect.provenance import open_store
from pipeline.detect.shipped import save_detector
from pipeline.detect.store import ActivationStore
from pipeline.detect.sweep import choose_detector, read_detector_scores, resolve_layers
from pipeline.io import replace_dir_atomic, write_json_atomic
from pipeline.layout import INDEX, PROBE_DIR, STORE, SWEEP
from stages import run_record, run_stage

OUT = PROBE_DIR


def _options(cfg: TrainConfig) -> dict[str, object]:
    """The training options a reader of ``train_metrics.json`` compares runs by."""
    return {k: getattr(cfg, k) for k in ("lr", "standardize", "weight_decay", "class_weight", "chunk_rows")}


def train_linear(name: str, cfg: TrainConfig, held_out_auroc: float, store: ActivationStore) -> None:
    """Fit linear probe ``name`` on the train split (its layer, if it picks one, on val) and write it."""
    index = read_index(INDEX)
    data = load_eval_data(index, store)
    inside = in_source_setting(index)
    lf, ls = int(cfg.fusion_layer), int(cfg.safety_layer)
    detector = fit_detector(data, inside, name, cfg, lf, ls)
    assert isinstance(detector, LinearDetector)
    val_auroc = auroc_or_nan(data.labels[inside.val], data.scores(detector, inside.val))
    meta = ProbeMeta(
        hidden_size=store.provenance.hidden_size,
        alpha=cfg.alpha,
        fusion_layer=lf,
        safety_layer=ls,
        best_epoch=-1,
        best_val_auroc=val_auroc,
        store_provenance=store.provenance.to_json(),
        detector=name,
        pieces=[p.label() for p in detector.pieces],
        held_out_auroc=held_out_auroc,
        pooling=store.provenance.pooling,
    )
    # Built beside data/probe and swapped in whole (persist: true in dvc.yaml).
    with replace_dir_atomic(OUT) as out:
        save_detector(detector, meta, out)
        write_json_atomic(out / "history.json", [])
        write_json_atomic(
            out / "train_metrics.json",
            {
                "detector": name,
                "pieces": meta.pieces,
                "held_out_auroc": held_out_auroc,
                "fusion_layer": lf,
                "safety_layer": ls,
                "best_epoch": -1,
                "best_val_auroc": val_auroc,
                "n_train": len(inside.train),
                "n_val": len(inside.val),
                "options": _options(cfg),
                "run": run_record(store.provenance.model_name, store.provenance.model_revision, "cpu"),
            },
        )
    print(f"shipped detector: {detector.describe()} (held-out AUROC {held_out_auroc:.3f}, val AUROC {val_auroc:.3f})")


def main() -> None:
    """Train the shipped detector on the train split and write it (LSI: its epochs' history too)."""
    params = load_params()
    cfg = params.train
    fusion_layer, safety_layer = resolve_layers(
        cfg.fusion_layer, cfg.safety_layer, cfg.select_by, SWEEP, cfg.select_tolerance
    )
    cfg = replace(cfg, fusion_layer=fusion_layer, safety_layer=safety_layer)
    chosen = choose_detector(read_detector_scores(SWEEP), params.guard.detector, cfg.select_tolerance)
    # Refuses a store written under another setup than params.yaml and the model folder say.
    store = open_store(params, STORE)
    if chosen.name != LSI:
        train_linear(chosen.name, cfg, chosen.held_out_auroc, store)
        return
    index = read_index(INDEX)
    sources = {}
    for split in ("train", "val"):
        part = index.filter(index["split"] == split)
        sources[split] = StoreFeatures(
            store=store,
            row_ids=part["row_id"].to_numpy(),
            labels=part["label"].to_numpy().astype(np.int64),
            fusion_layer=fusion_layer,
            safety_layer=safety_layer,
            chunk_rows=cfg.chunk_rows,
        )
    pooling = store.provenance.pooling
    detector = LSIDetector.from_config(cfg, fusion_layer, safety_layer, pooling).fit_sources(
        sources["train"], sources["val"], progress=True
    )
    history = detector.history_
    best = best_epoch(history)
    meta = ProbeMeta(
        hidden_size=store.provenance.hidden_size,
        alpha=cfg.alpha,
        fusion_layer=fusion_layer,
        safety_layer=safety_layer,
        best_epoch=best.epoch,
        best_val_auroc=best.val_auroc,
        store_provenance=store.provenance.to_json(),
        detector=LSI,
        held_out_auroc=chosen.held_out_auroc,
        pooling=pooling,
    )
    # Built beside data/probe and swapped in whole (persist: true in dvc.yaml).
    with replace_dir_atomic(OUT) as out:
        save_detector(detector, meta, out)
        write_json_atomic(out / "history.json", [asdict(r) for r in history])
        write_json_atomic(
            out / "train_metrics.json",
            {
                "fusion_layer": fusion_layer,
                "safety_layer": safety_layer,
                "best_epoch": best.epoch,
                "best_val_auroc": best.val_auroc,
                "best_val_loss": best.val_loss,
                "detector": LSI,
                "held_out_auroc": chosen.held_out_auroc,
                "n_train": len(sources["train"]),
                "n_val": len(sources["val"]),
                "options": _options(cfg),
                "run": run_record(store.provenance.model_name, store.provenance.model_revision, "cpu"),
            },
        )
    print(
        f"layers fusion {fusion_layer} / safety {safety_layer}: best epoch {best.epoch}, "
        f"val AUROC {best.val_auroc:.3f} (train n={len(sources['train'])})"
    )


if __name__ == "__main__":
    run_stage(main)
