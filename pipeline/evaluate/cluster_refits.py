"""The evaluation's held-out refits on a Dask cluster: one task per held-out group."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
import polars as pl
from distributed import Client

from pipeline.config import CalibrateConfig, TrainConfig
from pipeline.detect.cluster import gather_with_progress, use_core_share
from pipeline.detect.cluster_data import eval_data_shared, worker_eval_data
from pipeline.detect.store import ActivationStore
from pipeline.evaluate.detection import HeldOutResults, group_results, merge_held_out
from pipeline.evaluate.intervals import BootstrapSpec


def group_results_task(
    config: TrainConfig,
    calibration: CalibrateConfig,
    lf: int,
    ls: int,
    group: str,
    shipped_tau: tuple[str, float] | None,
    bootstrap: BootstrapSpec | None,
    by: str,
) -> HeldOutResults:
    """Task: :func:`~pipeline.evaluate.detection.group_results` on the states this worker read from the store."""
    use_core_share()
    return group_results(worker_eval_data(), config, calibration, lf, ls, group, shipped_tau, bootstrap, by)


def held_out_results_on_cluster(
    client: Client,
    store: ActivationStore,
    index: pl.DataFrame,
    refusal: np.ndarray | None,
    config: TrainConfig,
    calibration: CalibrateConfig,
    lf: int,
    ls: int,
    groups: Sequence[str],
    shipped_tau: tuple[str, float] | None = None,
    bootstrap: BootstrapSpec | None = None,
    by: str = "source",
    *,
    progress: bool = False,
) -> HeldOutResults:
    """:func:`~pipeline.evaluate.detection.held_out_results` with each group's refits run by a worker.

    ``refusal``: the refusal-direction score of every store row (as
    :func:`~pipeline.detect.heldout.load_eval_data` takes it), or ``None``. Same results, same order.
    ``progress``: a progress bar over the groups as their tasks finish.
    """
    run = uuid.uuid4().hex[:8]
    with eval_data_shared(client, store, index, refusal):
        futures = [
            client.submit(
                group_results_task,
                config,
                calibration,
                lf,
                ls,
                group,
                shipped_tau,
                bootstrap,
                by,
                key=f"held-out-refit-{run}-{i}",
                pure=False,
            )
            for i, group in enumerate(groups)
        ]
        return merge_held_out(
            gather_with_progress(client, futures, desc=f"held out by {by}", progress=progress, unit="group")
        )
