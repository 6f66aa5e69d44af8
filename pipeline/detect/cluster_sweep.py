"""The layer sweep on a Dask cluster: one task per (fusion, safety) pair, then one per (detector, held-out
group) at the chosen pair, each worker reading the store itself."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import polars as pl
from distributed import Client

from pipeline.config import TrainConfig
from pipeline.detect.cluster import gather_with_progress, use_core_share
from pipeline.detect.cluster_data import eval_data_shared, worker_eval_data
from pipeline.detect.detector import DETECTORS
from pipeline.detect.heldout import in_source_setting
from pipeline.detect.store import ActivationStore
from pipeline.detect.sweep import (
    DetectorScore,
    PairScore,
    SweepResult,
    best_pair,
    detector_auroc,
    detector_scores,
    held_out_group,
    held_out_score,
    held_out_settings,
    held_out_validation,
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
    return held_out_score(data, held_out_settings(data.index, config.held_out_by), config, lf, ls)


def detector_task(config: TrainConfig, name: str, group: str, lf: int, ls: int) -> float:
    """Task: :func:`~pipeline.detect.sweep.detector_auroc` of one detector without one held-out group."""
    use_core_share()
    data = worker_eval_data()
    setting = held_out_validation(data.index, config.held_out_by, group)
    return detector_auroc(data, setting, name, config, lf, ls)


def sweep_on_cluster(
    client: Client, store: ActivationStore, index: pl.DataFrame, config: TrainConfig, progress: bool = True
) -> SweepResult:
    """:func:`~pipeline.detect.sweep.sweep` with every fit run by the cluster's workers: same scores, same order.

    The workers read the store once for both halves and the detectors. Every training draws from
    ``config.seed`` alone, so where and in what order the tasks run changes no number.
    """
    with eval_data_shared(client, store, index):
        pairs = _sweep_pairs(client, store, index, config, progress)
        best = best_pair(pairs, config.select_by, config.select_tolerance)
        detectors = _score_detectors(client, index, config, best.fusion_layer, best.safety_layer, DETECTORS, progress)
    return SweepResult(pairs, best, detectors)


def sweep_pairs_on_cluster(
    client: Client, store: ActivationStore, index: pl.DataFrame, config: TrainConfig, progress: bool = True
) -> list[PairScore]:
    """:func:`~pipeline.detect.sweep.sweep_pairs` with the fits run by the cluster's workers: same scores, order.

    ``store`` is the finished store the driver opened (and checked); each worker opens it again.
    """
    with eval_data_shared(client, store, index):
        return _sweep_pairs(client, store, index, config, progress)


def score_detectors_on_cluster(
    client: Client,
    store: ActivationStore,
    index: pl.DataFrame,
    config: TrainConfig,
    lf: int,
    ls: int,
    names: tuple[str, ...] = DETECTORS,
    progress: bool = True,
) -> list[DetectorScore]:
    """:func:`~pipeline.detect.sweep.score_detectors` with the fits run by the cluster's workers: same scores."""
    with eval_data_shared(client, store, index):
        return _score_detectors(client, index, config, lf, ls, names, progress)


def _sweep_pairs(
    client: Client, store: ActivationStore, index: pl.DataFrame, config: TrainConfig, progress: bool
) -> list[PairScore]:
    """Both halves of the pair sweep on workers that hold the states. The in-source half runs first,
    one task a pair, since it picks the pairs the held-out half scores."""
    run = uuid.uuid4().hex[:8]
    pairs = layer_pairs(tuple(store.provenance.layers))
    val = _run_tasks(client, val_task, config, pairs, f"sweep-val-{run}", "layer sweep, in-source", progress)
    chosen = pairs_for_held_out(pairs, val, config.held_out_pairs)
    prefix = f"sweep-held-out-{run}"
    cross = _run_tasks(client, held_out_task, config, chosen, prefix, "layer sweep, held-out", progress)
    return pair_scores(pairs, val, dict(zip(chosen, cross, strict=True)))


def _score_detectors(
    client: Client,
    index: pl.DataFrame,
    config: TrainConfig,
    lf: int,
    ls: int,
    names: tuple[str, ...],
    progress: bool,
) -> list[DetectorScore]:
    """:func:`~pipeline.detect.sweep.score_detectors` on workers that hold the states: one task per
    (detector, held-out group), so the slow detectors' groups spread over the workers."""
    run = uuid.uuid4().hex[:8]
    groups = [held_out_group(s) for s in held_out_settings(index, config.held_out_by)]
    futures = [
        client.submit(detector_task, config, name, group, lf, ls, key=f"detectors-{run}-{name}-{g}", pure=False)
        for name in names
        for g, group in enumerate(groups)
    ]
    flat = gather_with_progress(client, futures, desc="detectors", progress=progress, unit="fit")
    per_detector = [flat[i * len(groups) : (i + 1) * len(groups)] for i in range(len(names))]
    return detector_scores(names, groups, per_detector, config)


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
