"""The parallel stages' way to their Dask cluster, importable without the optional 'cluster' extra.

``cluster.address`` empty runs everything in this process and needs no Dask scheduler. ``auto``
(the default) is made concrete per stage by :func:`resolve_cluster`. Any other address needs
``distributed``, which the 'cluster' extra installs; it is checked here before
:mod:`pipeline.detect.cluster` (which imports it) is loaded, so a missing extra is one error naming
it, raised before a stage does any work.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.config import ClusterConfig
from pipeline.detect.cores import available_cores
from pipeline.extras import installed, require

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

AUTO = "auto"


def auto_address(*, with_model: bool, cores: int, distributed_installed: bool) -> str:
    """What ``cluster.address: auto`` means for one stage: ``local:<cores>`` or ``""`` (in process).

    Work without a model (the sweep's pairs, the held-out refits) is many small fits: one worker
    process per core, each single-threaded, ran ``evaluate``'s refits 2.3-3.1x faster than this
    process with both cores (``bench/refits.py``, 2 cores), where small BLAS calls spend their
    time handing work between threads. The fits' sums are rounded in another order there, so a
    row's score can differ from the in-process one (by up to 0.36 for LSI on the default run;
    docs/cluster.md).

    A model's forward passes already use every core in one process, and a second copy of the
    model per worker only costs memory, so stages with a model stay in process (``local:N``
    places one worker per GPU). Without ``distributed`` (the 'cluster' extra) or with one core,
    ``auto`` is in process.
    """
    if with_model or cores < 2 or not distributed_installed:
        return ""
    return f"local:{cores}"


def resolve_cluster(config: ClusterConfig, *, with_model: bool) -> ClusterConfig:
    """``config`` with ``auto`` replaced by this stage's concrete address on this machine; others as given."""
    if config.address != AUTO:
        return config
    address = auto_address(
        with_model=with_model,
        cores=available_cores(),
        distributed_installed=installed("distributed"),
    )
    log.info("cluster.address auto: %s", address or "in this process")
    return dataclasses.replace(config, address=address)


def require_cluster(config: ClusterConfig) -> None:
    """Raise :class:`~pipeline.extras.MissingExtraError` when ``config`` names a cluster but distributed is missing."""
    if config.address and config.address != AUTO:
        require("distributed", "cluster", f"cluster.address {config.address!r} (a Dask cluster)")


@contextmanager
def open_cluster(config: ClusterConfig, gpus: int = 0) -> Iterator[Client | None]:
    """:func:`pipeline.detect.cluster.cluster_client` for ``config``; ``None`` in process, without importing Dask's.

    ``config`` must be resolved (:func:`resolve_cluster`). ``gpus``: GPUs a ``local:N`` cluster
    pins its workers to (0: none, for work without a model).
    """
    if config.address == AUTO:
        raise ValueError("cluster.address 'auto' must be resolved for the stage first (resolve_cluster)")
    if not config.address:
        yield None
        return
    require_cluster(config)
    from pipeline.detect.cluster import cluster_client

    with cluster_client(config, gpus) as client:
        yield client
