"""Extraction on a Dask cluster: workers compute whole shards, this process alone writes the store.

Every worker loads the model once (:class:`ModelPlugin`, again on a worker Dask starts to replace
a dead one) and computes one shard's states per task. The driver writes each finished shard
into the store as it arrives, exactly as :func:`~pipeline.detect.extraction.extract_to_store`
does, so the resume protocol, the single writer and the store's guarantees are unchanged: a
worker that dies mid-shard loses that shard only, which Dask computes again elsewhere, and the
store only ever receives whole shards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from distributed import Client, Future, KilledWorker, as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from tqdm import tqdm

from pipeline.config import DEFAULT_LIMITS, ContrastivePrompts, ExtractConfig, ModelConfig
from pipeline.detect.cluster import ClusterError, use_core_share
from pipeline.detect.extraction import (
    compute_rows,
    config_provenance,
    inputs_digest,
    open_or_create_store,
    requests_from_index,
)
from pipeline.detect.store import ActivationStore
from pipeline.detect.store_schema import STORE_DTYPE, Provenance
from pipeline.models.base import ModelAdapter, Request
from pipeline.models.registry import load_adapter

MODEL_PLUGIN = "lsi-guard-model"

AdapterLoader = Callable[[], ModelAdapter]


class ModelPlugin(WorkerPlugin):
    """Loads the model once on every worker, before the worker takes a shard.

    ``load`` must be picklable (it is sent to the workers): a module-level function, or a
    ``functools.partial`` of one, such as :func:`model_loader`'s.
    """

    idempotent = False  # a new extraction's plugin replaces an earlier one (another model, say)

    def __init__(self, load: AdapterLoader) -> None:
        self.load = load
        self.adapter: ModelAdapter | None = None

    async def setup(self, worker: Any) -> None:
        """Load the model in a thread, so the worker keeps answering the scheduler meanwhile."""
        self.adapter = await asyncio.to_thread(self.load)

    def teardown(self, worker: Any) -> None:
        """Let the model go with the plugin (its memory, on a GPU too)."""
        self.adapter = None


def model_loader(
    config: ModelConfig, max_request_tokens: int | None = DEFAULT_LIMITS.max_request_tokens
) -> AdapterLoader:
    """What a worker calls to load the model ``config`` names (:func:`~pipeline.models.registry.load_adapter`)."""
    return partial(load_adapter, config, max_request_tokens)


def gpus_to_pin(config: ModelConfig) -> int:
    """GPUs a ``local:N`` cluster spreads its workers over: none for a CPU model, else every visible one."""
    if config.device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def worker_model_config(config: ModelConfig, gpus: int) -> ModelConfig:
    """The model section as a pinned worker reads it: its one visible GPU is ``cuda``, whatever index was set."""
    if gpus and config.device.startswith("cuda"):
        return replace(config, device="cuda")
    return config


def worker_adapter() -> ModelAdapter:
    """Inside a task: the model this worker's :class:`ModelPlugin` loaded."""
    worker = get_worker()
    plugin = worker.plugins.get(MODEL_PLUGIN)
    if not isinstance(plugin, ModelPlugin) or plugin.adapter is None:
        raise ClusterError(f"worker {worker.address} has no model loaded (plugin {MODEL_PLUGIN!r} is missing)")
    return plugin.adapter


def worker_provenance(prompts: ContrastivePrompts, config: ExtractConfig) -> Provenance:
    """Task: the provenance of the states this worker's model computes (its dtype and block count as loaded there)."""
    return config_provenance(worker_adapter(), prompts, config)


def extract_shard(
    requests: list[Request], row_ids: list[int], prompts: ContrastivePrompts, config: ExtractConfig
) -> np.ndarray:
    """Task: one shard's states, as the store will hold them (the driver writes them unchanged)."""
    use_core_share()
    states = compute_rows(worker_adapter(), requests, row_ids, prompts, config)
    return states.astype(STORE_DTYPE)  # half the bytes to send; the store casts to this dtype anyway


ShardHook = Callable[[int, int], None]


def extract_on_cluster(
    client: Client,
    load: AdapterLoader,
    index: pl.DataFrame,
    prompts: ContrastivePrompts,
    config: ExtractConfig,
    path: Path,
    progress: bool = True,
    on_shard: ShardHook | None = None,
) -> ActivationStore:
    """:func:`~pipeline.detect.extraction.extract_to_store` with the shards computed by the cluster's workers.

    ``load`` loads the model on each worker (:func:`model_loader`). The store at ``path`` is
    created or resumed exactly as in process (same setup checks, same provenance, taken from a
    worker's model) and ends equal to the one an in-process run writes. ``on_shard(start, end)``
    is called after each shard is written.
    """
    client.register_plugin(ModelPlugin(load), name=MODEL_PLUGIN)
    index = index.sort("row_id")
    requests = requests_from_index(index)
    row_ids = index["row_id"].to_list()
    provenance = client.submit(worker_provenance, prompts, config, pure=False).result()
    store = open_or_create_store(Path(path), row_ids, provenance, config, inputs_digest(requests))
    if store.is_complete:
        return store
    run = uuid.uuid4().hex[:8]
    blocks: dict[Future, tuple[int, int]] = {}
    for start, end in store.missing_row_blocks():
        future = client.submit(
            extract_shard,
            requests[start:end],
            row_ids[start:end],
            prompts,
            config,
            key=f"extract-shard-{run}-{start}",
            pure=False,
        )
        blocks[future] = (start, end)
    done = len(store.shard_blocks()) - len(blocks)
    # The context manager ends the progress line even on error, so the error starts on its own line.
    with tqdm(total=len(store.shard_blocks()), initial=done, desc="extract", unit="shard", disable=not progress) as bar:
        try:
            for future, states in as_completed(blocks, loop=client.loop, with_results=True):
                start, end = blocks.pop(future)
                store.write_block(start, states)
                bar.update(1)
                if on_shard is not None:
                    on_shard(start, end)
        except KilledWorker as exc:
            raise ClusterError(
                f"{path}: a shard's task killed every worker that ran it ({exc}); the shards written so far are"
                " kept, and a rerun computes only the rest"
            ) from None
        finally:
            client.cancel(list(blocks))  # on error: the shards not written yet stop computing
    store.mark_complete()
    return store
