"""DVC stage ``extract``: the model's forward passes, once, into a Zarr activation store.

The store is written beside its target and swapped into place when complete
(:mod:`pipeline.detect.store_swap`), so a run killed at any moment loses nothing. With
``cluster.address`` set, the shards are computed by a Dask cluster's workers and this process
writes them (:mod:`pipeline.detect.cluster_extraction`); the store is the same.
"""

from __future__ import annotations

from pipeline.config import load_params
from pipeline.data.index import read_index
from pipeline.detect.cluster_open import open_cluster, require_cluster, resolve_cluster
from pipeline.detect.extraction import extract_to_store
from pipeline.detect.store_swap import partial_path, recover_swap, swap_into_place
from pipeline.layout import INDEX, STORE
from pipeline.models.registry import load_adapter
from stages import run_stage


def main() -> None:
    """Extract every indexed request's states into the partial store (resuming it), then move it into place."""
    params = load_params()
    index = read_index(INDEX)
    recover_swap(STORE)
    # An earlier good store is only replaced by a finished one, and a killed run never leaves a
    # store that looks finished under the final name.
    partial = partial_path(STORE)
    cluster = resolve_cluster(params.cluster, with_model=True)
    require_cluster(cluster)
    gpus = 0
    if cluster.local_workers:
        from pipeline.detect.cluster_extraction import gpus_to_pin  # needs the 'cluster' extra, checked above

        gpus = gpus_to_pin(params.model)
    with open_cluster(cluster, gpus) as client:
        if client is None:
            adapter = load_adapter(params.model, params.limits.max_request_tokens)
            store = extract_to_store(adapter, index, params.prompts, params.extract, partial)
        else:
            # Imported only with a cluster: these modules import distributed (the 'cluster' extra).
            from pipeline.detect.cluster_extraction import extract_on_cluster, model_loader, worker_model_config

            load = model_loader(worker_model_config(params.model, gpus), params.limits.max_request_tokens)
            store = extract_on_cluster(client, load, index, params.prompts, params.extract, partial)
    layers = len(store.provenance.layers)
    swap_into_place(partial, STORE)
    print(f"stored {len(index)} rows x {layers} layers ({params.extract.pooling} pooling) -> {STORE}")


if __name__ == "__main__":
    run_stage(main)
