"""DVC stage ``sweep``: LSI at every (fusion, safety) pair of stored layers, from the store (no model needed).

Writes ``data/sweep/sweep.json`` (every pair's in-source validation AUROC and mean held-out AUROC
over the groups ``train.held_out_by`` names, upstream projects by default; ``train`` reads it when
a layer is ``best``; and, at the chosen pair, every detector's held-out validation AUROC, which
``train`` ships the best of under ``guard.detector: best``),
``sweep_plot.json`` for ``dvc plots`` and one
heatmap PNG per score.
"""

from __future__ import annotations

import math
from dataclasses import asdict

from pipeline.config import load_params
from pipeline.data.index import read_index
from pipeline.detect.cluster_open import open_cluster, resolve_cluster
from pipeline.detect.heldout import load_eval_data
from pipeline.detect.provenance import open_store
from pipeline.detect.sweep import score_matrix, sweep
from pipeline.evaluate.plots import plot_heatmap
from pipeline.io import replace_dir_atomic, write_json_atomic
from pipeline.layout import INDEX, STORE, SWEEP, SWEEP_DIR, SWEEP_PLOT
from stages import run_record, run_stage

OUT = SWEEP_DIR
TITLES = {
    "val_auroc": "LSI validation AUROC, in-source",
    "held_out_auroc": "LSI AUROC on held-out groups (mean; blank: not shortlisted)",
}


def main() -> None:
    """Sweep, then write the scores, the chosen pair and the heatmaps."""
    params = load_params()
    index, store = read_index(INDEX), open_store(params, STORE)
    with open_cluster(resolve_cluster(params.cluster, with_model=False)) as client:
        if client is None:
            result = sweep(load_eval_data(index, store), params.train)
        else:
            # On a cluster each fit is a task, and each worker reads the store itself. Imported only
            # here: it imports distributed (the 'cluster' extra, which open_cluster checked).
            from pipeline.detect.cluster_sweep import sweep_on_cluster

            result = sweep_on_cluster(client, store, index, params.train)
    layers = tuple(store.provenance.layers)
    scores, best, detectors = result.pairs, result.best, result.detectors
    # Built beside data/sweep and swapped in whole (persist: true in dvc.yaml).
    with replace_dir_atomic(OUT) as out:
        for key, title in TITLES.items():
            plot_heatmap(
                score_matrix(scores, layers, key),
                row_labels=list(layers),
                col_labels=list(layers),
                path=out / f"{key}.png",
                title=title,
                xlabel="safety layer (h_s)",
                ylabel="fusion layer (delta_h)",
            )
        write_json_atomic(
            out / SWEEP.name,
            {
                "layers": list(layers),
                "select_by": params.train.select_by,
                "held_out_by": params.train.held_out_by,
                "best": asdict(best),
                "pairs": [asdict(s) for s in scores],
                "detectors": [asdict(d) for d in detectors],
                "run": run_record(store.provenance.model_name, store.provenance.model_revision, "cpu"),
            },
        )
        # The bar plot's x is the held-out AUROC: only the pairs the held-out half scored (train.held_out_pairs).
        write_json_atomic(
            out / SWEEP_PLOT.name,
            [
                {"pair": f"lf{s.fusion_layer}-ls{s.safety_layer}", **asdict(s)}
                for s in scores
                if not math.isnan(s.held_out_auroc)
            ],
        )
    print(
        f"best pair by {params.train.select_by}: fusion {best.fusion_layer}, safety {best.safety_layer} "
        f"(val AUROC {best.val_auroc:.3f}, held-out-{params.train.held_out_by} AUROC {best.held_out_auroc:.3f})"
    )
    print(f"held-out-{params.train.held_out_by} validation AUROC per detector at that pair (mean, then per group):")
    for d in detectors:
        cells = "  ".join(f"{group} {auroc:.3f}" for group, auroc in d.per_group.items())
        seeds = f" (mean of {d.seeds} seeds)" if d.seeds > 1 else ""
        print(f"  {d.name:18s} {d.held_out_auroc:.3f}   {cells}{seeds}")


if __name__ == "__main__":
    run_stage(main)
