"""Connecting to the Dask cluster the parallel stages run on, and each worker's share of the cores.

``cluster.address`` in ``params.yaml`` says where: empty runs everything in this process (no Dask
at all), ``local:N`` starts N worker processes here, one per GPU when there are GPUs, and anything
else is the address of a running scheduler (``dask scheduler`` / ``dask worker``, dask-jobqueue,
dask-kubernetes). Scheduling, retries and replacing dead workers are Dask's; this module only
opens the client and pins every worker's thread pools to its share of its machine's cores, so
N workers on N cores run side by side instead of fighting over them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, Future, Nanny, Scheduler, SpecCluster, as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from tqdm import tqdm

from pipeline.config import ClusterConfig
from pipeline.detect.cores import available_cores
from pipeline.errors import LSIGuardError

log = logging.getLogger(__name__)

CORE_SHARE_PLUGIN = "lsi-guard-core-share"
TRIM_SETTING = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


class ClusterError(LSIGuardError, RuntimeError):
    """A Dask scheduler that does not answer, or one without workers, named by its address."""


def core_share(cores: int, task_threads_on_host: int) -> int:
    """Threads one task gets when ``task_threads_on_host`` task threads share ``cores`` cores (at least 1)."""
    return max(1, cores // max(1, task_threads_on_host))


def set_thread_count(threads: int) -> None:
    """Pin torch's intra-op pool and the BLAS pools (numpy, scikit-learn) of this process to ``threads``."""
    import torch
    from threadpoolctl import threadpool_limits

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    threadpool_limits(limits=threads)  # applies at once and stays (no ``with``)


class CoreSharePlugin(WorkerPlugin):
    """Pins each worker's thread pools to its share of its machine's cores when it starts.

    Several torch processes at default threads on the same cores ran about ten times slower each
    (measured on 2 cores with 3-4 processes), so every worker gets ``cores // task threads on its
    host``, counted over the workers the scheduler knew when the plugin was registered. A worker
    that joins later on a host not counted then gets its cores divided by its own task threads.
    """

    idempotent = False  # registering again (more workers known) replaces the counts

    def __init__(self, task_threads_by_host: Mapping[str, int]) -> None:
        self.task_threads_by_host = dict(task_threads_by_host)
        self.threads = 1

    def setup(self, worker: Any) -> None:
        """Work out this worker's share and pin its pools to it."""
        host_threads = self.task_threads_by_host.get(worker.ip, worker.state.nthreads)
        self.threads = core_share(available_cores(), host_threads)
        set_thread_count(self.threads)


def use_core_share() -> int:
    """Inside a task: pin the pools again (a task thread may predate the plugin) and return the share."""
    plugin = get_worker().plugins.get(CORE_SHARE_PLUGIN)
    threads = plugin.threads if isinstance(plugin, CoreSharePlugin) else 1
    set_thread_count(threads)
    return threads


def task_threads_by_host(client: Client) -> dict[str, int]:
    """Task threads of the workers the scheduler knows, summed per host."""
    counts: Counter[str] = Counter()
    for info in client.scheduler_info(n_workers=-1)["workers"].values():
        counts[str(info["host"])] += int(info["nthreads"])
    return dict(counts)


def local_cluster(workers: int, gpus: int = 0) -> SpecCluster:
    """``workers`` worker processes on this machine, one task thread each; with ``gpus``, worker i sees GPU i mod gpus.

    Each worker sees its one GPU as ``cuda:0`` (``CUDA_VISIBLE_DEVICES``), so a model loads on its own GPU.
    """
    dashboard = ":0" if importlib.util.find_spec("bokeh") else None  # the dashboard needs bokeh
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "port": 0, "dashboard": dashboard is not None, "dashboard_address": dashboard},
    }
    specs: dict[int, dict[str, Any]] = {}
    for i in range(workers):
        env = {"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else {}
        options = {
            "host": "127.0.0.1",
            "nthreads": 1,
            # No per-worker memory cap: each worker holds a whole model, and Dask's default cap
            # (the machine's memory / workers) would restart one whose model alone exceeds it.
            "memory_limit": 0,
            "env": env,
            "silence_logs": logging.WARNING,
            "dashboard": False,
        }
        specs[i] = {"cls": Nanny, "options": options}
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also fixes glibc's mmap
    # threshold at 128 KiB: every tensor that size or larger is then mapped and zeroed anew at each
    # allocation, and probe training ran about twice as slow (bench/scale.py). None: glibc's default.
    with dask.config.set({TRIM_SETTING: None}):  # read when each nanny is built, here
        return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.WARNING, name=f"local:{workers}")


def connect(address: str, timeout_s: float) -> Client:
    """A client of the scheduler at ``address`` that has at least one worker, or a :class:`ClusterError` naming it."""
    try:
        client = Client(address, timeout=timeout_s, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"cluster.address {address}: no Dask scheduler answered within {timeout_s:g} s ({exc}); start one"
            f" (dask scheduler) or set cluster.address to '' to run in this process"
        ) from None
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except TimeoutError:
        client.close()
        raise ClusterError(
            f"cluster.address {address}: the scheduler answered but no worker joined within {timeout_s:g} s;"
            f" start workers with: dask worker {address} --nthreads 1"
        ) from None
    return client


def prepare_workers(client: Client) -> None:
    """Pin every worker's pools to its share of its cores (now, and on workers that join later)."""
    client.register_plugin(CoreSharePlugin(task_threads_by_host(client)), name=CORE_SHARE_PLUGIN)
    dashboard = client.scheduler_info().get("services", {}).get("dashboard")
    if dashboard is not None:
        log.info("Dask dashboard: %s", client.dashboard_link)
    log.info("Dask cluster %s: %d workers", client.scheduler.address, len(client.scheduler_info()["workers"]))


@contextmanager
def cluster_client(config: ClusterConfig, gpus: int = 0) -> Iterator[Client | None]:
    """The client ``config`` names, or ``None`` for in-process work; closed (a local cluster stopped) on exit.

    ``gpus``: GPUs a ``local:N`` cluster pins its workers to (0: none, for work without a model).
    """
    if not config.address:
        yield None
        return
    local = config.local_workers
    cluster = local_cluster(local, gpus) if local is not None else None
    try:
        if cluster is not None:
            client = Client(cluster, timeout=config.connect_timeout_s, set_as_default=False)
            client.wait_for_workers(local, timeout=config.connect_timeout_s)
        else:
            client = connect(config.address, config.connect_timeout_s)
        try:
            prepare_workers(client)
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def gather_with_progress(
    client: Client, futures: Sequence[Future], *, desc: str, progress: bool, unit: str = "it"
) -> list[Any]:
    """The futures' results in the futures' order, with a progress bar (``desc``) ticking as each task finishes."""
    finished = as_completed(futures, loop=client.loop)
    for _ in tqdm(finished, total=len(futures), desc=desc, unit=unit, disable=not progress):
        pass
    return client.gather(futures)
