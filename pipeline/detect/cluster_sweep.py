"""The layer sweep on a Dask cluster: one task per (fusion, safety) pair, each worker reading the store itself."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import polars as pl
from distributed import Client

from pipeline.config import TrainConfig
from pipeline.detect.cluster import gather_with_progress, use_core_share
from pipeline.detect.cluster_data import release_eval_data, share_eval_data, worker_eval_data
from pipeline.detect.heldout import in_source_setting
from pipeline.detect.store import ActivationStore
from pipeline.detect.sweep import (
    PairScore,
    held_out_score,
    held_out_settings,
    layer_pairs,
    pair_scores,
    pairs_for_held_out,
    val_score,
)


def val_task(config: TrainConfig, lf: int, ls: int) -> float:
    """Task: :func:`~pipeline.detect.sweep.val_score` on the states this worker read from the store."""
    use_core_share()
    data = worker_eval_data()
    return val_score(data, in_source_setting(data.index), config, lf, ls)


def held_out_task(config: TrainConfig, lf: int, ls: int) -> float:
    """Task: :func:`~pipeline.detect.sweep.held_out_score` on the states this worker read from the store."""
    use_core_share()
    data = worker_eval_data()
    return held_out_score(data, held_out_settings(data, config.held_out_by), config, lf, ls)


def sweep_pairs_on_cluster(
    client: Client, store: ActivationStore, index: pl.DataFrame, config: TrainConfig, progress: bool = True
) -> list[PairScore]:
    """:func:`~pipeline.detect.sweep.sweep_pairs` with the fits run by the cluster's workers: same scores, order.

    ``store`` is the finished store the driver opened (and checked); each worker opens it again.
    The in-source half runs first, one task a pair, since it picks the pairs the held-out half
    scores. Every training draws from ``config.seed`` alone, so where and in what order the
    pairs run changes no number.
    """
    share_eval_data(client, store, index)
    run = uuid.uuid4().hex[:8]
    pairs = layer_pairs(tuple(store.provenance.layers))
    try:
        val = _run_tasks(client, val_task, config, pairs, f"sweep-val-{run}", "layer sweep, in-source", progress)
        chosen = pairs_for_held_out(pairs, val, config.held_out_pairs)
        cross = _run_tasks(
            client, held_out_task, config, chosen, f"sweep-held-out-{run}", "layer sweep, held-out", progress
        )
        return pair_scores(pairs, val, dict(zip(chosen, cross, strict=True)))
    finally:
        release_eval_data(client)


def _run_tasks(
    client: Client,
    task: Callable[[TrainConfig, int, int], float],
    config: TrainConfig,
    pairs: list[tuple[int, int]],
    prefix: str,
    desc: str,
    progress: bool,
) -> list[float]:
    """One task per pair, gathered in the pairs' order."""
    futures = [client.submit(task, config, lf, ls, key=f"{prefix}-{lf}-{ls}", pure=False) for lf, ls in pairs]
    return gather_with_progress(client, futures, desc=desc, progress=progress)
