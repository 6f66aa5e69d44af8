"""The parallel stages' way to their Dask cluster, importable without the optional 'cluster' extra.

``cluster.address`` empty (the default) runs everything in this process and needs no Dask
scheduler. Any other address needs ``distributed``, which the 'cluster' extra installs; it is
checked here before :mod:`pipeline.detect.cluster` (which imports it) is loaded, so a missing
extra is one error naming it, raised before a stage does any work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.config import ClusterConfig
from pipeline.extras import require

if TYPE_CHECKING:
    from distributed import Client


def require_cluster(config: ClusterConfig) -> None:
    """Raise :class:`~pipeline.extras.MissingExtraError` when ``config`` names a cluster but distributed is missing."""
    if config.address:
        require("distributed", "cluster", f"cluster.address {config.address!r} (a Dask cluster)")


@contextmanager
def open_cluster(config: ClusterConfig, gpus: int = 0) -> Iterator[Client | None]:
    """:func:`pipeline.detect.cluster.cluster_client` for ``config``; ``None`` in process, without importing Dask's.

    ``gpus``: GPUs a ``local:N`` cluster pins its workers to (0: none, for work without a model).
    """
    if not config.address:
        yield None
        return
    require_cluster(config)
    from pipeline.detect.cluster import cluster_client

    with cluster_client(config, gpus) as client:
        yield client
