"""The stored states, read by each worker of a Dask cluster from the store itself.

Training tasks (the sweep's layer pairs, the evaluation's held-out refits) need every row's
states. Instead of shipping them from the driver with every task, each worker opens the store
(through zarr and dask, every shard checked against its checksums) and reads it once, when
:class:`EvalDataPlugin` is registered; the tasks then take it from the worker. A worker Dask starts
to replace a dead one reads it again, the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import numpy as np
import polars as pl
from distributed import Client, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.detect.cluster import ClusterError
from pipeline.detect.heldout import EvalData, load_eval_data
from pipeline.detect.store import ActivationStore
from pipeline.detect.store_schema import Provenance

EVAL_DATA_PLUGIN = "lsi-guard-eval-data"


def read_eval_data(
    path: Path, index: pl.DataFrame, provenance: Provenance, refusal: np.ndarray | None = None
) -> EvalData:
    """:func:`~pipeline.detect.heldout.load_eval_data` from the finished store at ``path``, refusing another provenance.

    Read with dask's synchronous scheduler: the worker's task threads are the parallelism, and
    a thread pool per read would only compete with them for the cores.
    """
    store = ActivationStore.open(path, expected=provenance)
    with dask.config.set(scheduler="synchronous"):
        return load_eval_data(index, store, refusal)


class EvalDataPlugin(WorkerPlugin):
    """Reads the index rows' states from the store once per worker.

    ``provenance`` is the one the driver checked the store against: a worker that finds another
    store at ``path`` (another node's copy, say) refuses it by field name.
    """

    idempotent = False  # a new store or index replaces the earlier one

    def __init__(
        self, *, path: Path, index: pl.DataFrame, provenance: Provenance, refusal: np.ndarray | None = None
    ) -> None:
        self.path = Path(path)
        self.index = index
        self.provenance = provenance
        self.refusal = refusal
        self.data: EvalData | None = None

    async def setup(self, worker: Any) -> None:
        """Read the states in a thread, so the worker keeps answering the scheduler meanwhile."""
        self.data = await asyncio.to_thread(read_eval_data, self.path, self.index, self.provenance, self.refusal)

    def teardown(self, worker: Any) -> None:
        """Let the states go with the plugin."""
        self.data = None


def share_eval_data(
    client: Client, store: ActivationStore, index: pl.DataFrame, refusal: np.ndarray | None = None
) -> None:
    """Have every worker read ``index``'s rows from ``store`` (and take ``refusal``, per store row, as given)."""
    plugin = EvalDataPlugin(path=store.path, index=index, provenance=store.provenance, refusal=refusal)
    client.register_plugin(plugin, name=EVAL_DATA_PLUGIN)


def release_eval_data(client: Client) -> None:
    """Free the workers' copies of the states."""
    client.unregister_worker_plugin(EVAL_DATA_PLUGIN)


@contextmanager
def eval_data_shared(
    client: Client, store: ActivationStore, index: pl.DataFrame, refusal: np.ndarray | None = None
) -> Iterator[None]:
    """:func:`share_eval_data` for the ``with`` block's tasks, released when it ends (on an error too)."""
    share_eval_data(client, store, index, refusal)
    try:
        yield
    finally:
        release_eval_data(client)


def worker_eval_data() -> EvalData:
    """Inside a task: the states this worker read when :func:`share_eval_data` registered the plugin."""
    worker = get_worker()
    plugin = worker.plugins.get(EVAL_DATA_PLUGIN)
    if not isinstance(plugin, EvalDataPlugin) or plugin.data is None:
        raise ClusterError(f"worker {worker.address} holds no stored states (plugin {EVAL_DATA_PLUGIN!r} is missing)")
    return plugin.data
