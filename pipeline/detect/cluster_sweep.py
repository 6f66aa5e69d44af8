"""The layer sweep on a Dask cluster: one task per (fusion, safety) pair, each worker reading the store itself."""

from __future__ import annotations

import uuid

import polars as pl
from distributed import Client, as_completed
from tqdm import tqdm

from pipeline.config import TrainConfig
from pipeline.detect.cluster import use_core_share
from pipeline.detect.cluster_data import release_eval_data, share_eval_data, worker_eval_data
from pipeline.detect.heldout import in_source_setting
from pipeline.detect.store import ActivationStore
from pipeline.detect.sweep import PairScore, held_out_settings, layer_pairs, score_pair


def score_pair_task(config: TrainConfig, lf: int, ls: int) -> PairScore:
    """Task: :func:`~pipeline.detect.sweep.score_pair` on the states this worker read from the store."""
    use_core_share()
    data = worker_eval_data()
    return score_pair(data, in_source_setting(data.index), held_out_settings(data), config, lf, ls)


def sweep_pairs_on_cluster(
    client: Client, store: ActivationStore, index: pl.DataFrame, config: TrainConfig, progress: bool = True
) -> list[PairScore]:
    """:func:`~pipeline.detect.sweep.sweep_pairs` with the pairs trained by the cluster's workers: same scores, order.

    ``store`` is the finished store the driver opened (and checked); each worker opens it again.
    Every training draws from ``config.seed`` alone, so where and in what order the pairs run
    changes no number.
    """
    share_eval_data(client, store, index)
    run = uuid.uuid4().hex[:8]
    try:
        futures = [
            client.submit(score_pair_task, config, lf, ls, key=f"sweep-pair-{run}-{lf}-{ls}", pure=False)
            for lf, ls in layer_pairs(tuple(store.provenance.layers))
        ]
        done = as_completed(futures, loop=client.loop)
        for _ in tqdm(done, total=len(futures), desc="layer sweep", disable=not progress):
            pass
        return client.gather(futures)
    finally:
        release_eval_data(client)
