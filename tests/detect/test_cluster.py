"""Extraction, the layer sweep and the held-out refits on a local Dask cluster of two worker processes.

Each must give exactly what the in-process path gives: the same store (arrays and attributes),
the same sweep scores, the same held-out results. A worker killed mid-extraction loses only the
shard it was computing.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from distributed import Client
from PIL import Image
from threadpoolctl import threadpool_info, threadpool_limits

from pipeline.config import CalibrateConfig, ClusterConfig, ConfigError, ContrastivePrompts, ExtractConfig
from pipeline.detect.cluster import ClusterError, cluster_client, core_share
from pipeline.detect.cluster_data import EVAL_DATA_PLUGIN
from pipeline.detect.cluster_extraction import extract_on_cluster
from pipeline.detect.cluster_sweep import score_detectors_on_cluster, sweep_on_cluster, sweep_pairs_on_cluster
from pipeline.detect.cores import available_cores
from pipeline.detect.extraction import ExtractionError, extract_to_store
from pipeline.detect.heldout import load_eval_data
from pipeline.detect.store import ActivationStore
from pipeline.detect.store_schema import Provenance, StoreError
from pipeline.detect.sweep import sweep, sweep_pairs
from pipeline.evaluate.cluster_refits import held_out_results_on_cluster
from pipeline.evaluate.detection import held_out_results
from pipeline.evaluate.intervals import BootstrapSpec
from tests.evaluate.test_detection import CONFIG, synthetic_data
from tests.evaluate.test_detection import LAYERS as SYNTHETIC_LAYERS
from tests.paths import PROJECT_ROOT
from tests.slow_adapter import load_tiny

LAYERS = (0, 1, 3)
WORKERS = 2
EXTRACT = ExtractConfig(layers=LAYERS, batch_size=2, shard_rows=2)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """A local cluster of two worker processes (started once: spawning them takes seconds)."""
    with cluster_client(ClusterConfig(address=f"local:{WORKERS}", connect_timeout_s=120)) as connected:
        assert connected is not None
        yield connected


@contextmanager
def workers_thread_count() -> Iterator[None]:
    """Run this process's pools at the thread count each worker runs at, as a fair in-process reference."""
    share = core_share(available_cores(), WORKERS)
    before = torch.get_num_threads()
    torch.set_num_threads(share)
    try:
        with threadpool_limits(limits=share):
            yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    """Thirteen requests, most with an image: seven shards of two rows, the last one short."""
    folder = tmp_path_factory.mktemp("cluster-imgs")
    rows = []
    for i in range(13):
        image = None
        if i % 3 != 0:
            image = folder / f"{i}.png"
            Image.new("RGB", (40, 30), (15 * i, 90, 255 - 15 * i)).save(image)
        rows.append(
            {"row_id": 100 + i, "text": f"request {i} " + "word " * i, "image_path": str(image) if image else None}
        )
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def in_process_store(tiny_llava_folder: Path, index: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store today's in-process path writes."""
    path = tmp_path_factory.mktemp("in-process") / "store.zarr"
    with workers_thread_count():
        extract_to_store(load_tiny(tiny_llava_folder), index, ContrastivePrompts(), EXTRACT, path, progress=False)
    return path


def store_content(path: Path) -> dict[str, Any]:
    """Everything a reader sees in a store: its arrays, bit for bit, and its attributes."""
    store = ActivationStore.open(path)
    states = np.asarray(store.group["states"][:])
    return {
        "states": states.tobytes(),
        "shape": states.shape,
        "row_id": store.row_ids.tolist(),
        "attrs": dict(store.group.attrs),
        "written": store.written_shards(),
    }


def test_cluster_store_equals_the_in_process_store(
    client: Client, tiny_llava_folder: Path, index: pl.DataFrame, in_process_store: Path, tmp_path: Path
) -> None:
    path = tmp_path / "store.zarr"
    written: list[tuple[int, int]] = []
    store = extract_on_cluster(
        client,
        partial(load_tiny, tiny_llava_folder),
        index,
        ContrastivePrompts(),
        EXTRACT,
        path,
        progress=False,
        on_shard=lambda start, end: written.append((start, end)),
    )
    assert store.is_complete
    assert sorted(written) == store.shard_blocks()  # each shard written once, by this process
    assert store_content(path) == store_content(in_process_store)


def test_a_worker_killed_mid_extraction_loses_only_its_shard(
    client: Client, tiny_llava_folder: Path, index: pl.DataFrame, in_process_store: Path, tmp_path: Path
) -> None:
    killed: dict[str, Any] = {}

    def kill_a_busy_worker(start: int, end: int) -> None:
        if killed:
            return
        # A worker with a shard in hand (each batch sleeps 0.5 s, so the other worker is mid-shard).
        busy = {address: keys for address, keys in client.processing().items() if keys}
        address = sorted(busy)[0]
        pid = client.run(os.getpid, workers=[address])[address]
        killed.update(address=address, pid=pid, shards=list(busy[address]))
        os.kill(pid, signal.SIGKILL)

    path = tmp_path / "store.zarr"
    store = extract_on_cluster(
        client,
        partial(load_tiny, tiny_llava_folder, 0.5),
        index,
        ContrastivePrompts(),
        EXTRACT,
        path,
        progress=False,
        on_shard=kill_a_busy_worker,
    )
    assert killed["shards"], "the killed worker held no shard"
    assert store.is_complete
    assert store_content(path) == store_content(in_process_store)  # no row lost, duplicated or changed
    client.wait_for_workers(WORKERS, timeout=120)  # Dask's nanny started a new worker in its place
    assert killed["pid"] not in client.run(os.getpid).values()


def test_an_unreadable_image_names_its_rows_and_keeps_the_store_unfinished(
    client: Client, tiny_llava_folder: Path, index: pl.DataFrame, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = index.with_columns(
        pl.when(pl.col("row_id") == 105).then(pl.lit(str(broken))).otherwise(pl.col("image_path")).alias("image_path")
    )
    path = tmp_path / "store.zarr"
    with pytest.raises(ExtractionError, match=r"index rows \[104, 105\]: .*broken.png"):
        extract_on_cluster(
            client, partial(load_tiny, tiny_llava_folder), bad, ContrastivePrompts(), EXTRACT, path, progress=False
        )
    with pytest.raises(StoreError, match="did not finish"):
        ActivationStore.open(path)


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[ActivationStore, pl.DataFrame, np.ndarray]:
    """Three sources' states in a finished store, its index and a refusal score per store row."""
    data = synthetic_data()
    assert data.refusal is not None
    provenance = Provenance(
        model_name="synthetic",
        model_revision="0",
        model_dtype="float32",
        template_benign="b {q}",
        template_malicious="m {q}",
        variants=("benign", "malicious", "plain"),
        layers=SYNTHETIC_LAYERS,
        hidden_size=data.states.shape[-1],
    )
    path = tmp_path_factory.mktemp("synthetic") / "store.zarr"
    store = ActivationStore.create(path, data.index["row_id"].to_list(), provenance, shard_rows=64)
    for start, end in store.shard_blocks():
        store.write_block(start, data.states[start:end])
    store.mark_complete()
    return ActivationStore.open(path), data.index, data.refusal


def test_sweep_on_the_cluster_equals_the_in_process_sweep(
    client: Client, synthetic_store: tuple[ActivationStore, pl.DataFrame, np.ndarray]
) -> None:
    store, index, _ = synthetic_store
    config = replace(CONFIG, epochs=3, held_out_pairs=3)  # both halves, the held-out one on a shortlist
    with workers_thread_count():
        expected = sweep_pairs(load_eval_data(index, store), config, progress=False)
    found = sweep_pairs_on_cluster(client, store, index, config, progress=False)
    assert len(found) == len(SYNTHETIC_LAYERS) ** 2
    assert repr(found) == repr(expected)  # repr: every float to the last bit, NaN equal to NaN


def test_sweep_and_detector_scores_on_the_cluster_equal_the_in_process_ones(
    client: Client, synthetic_store: tuple[ActivationStore, pl.DataFrame, np.ndarray]
) -> None:
    store, index, _ = synthetic_store
    config = replace(CONFIG, epochs=3, held_out_pairs=2)
    with workers_thread_count():
        expected = sweep(load_eval_data(index, store), config, progress=False)
    found = sweep_on_cluster(client, store, index, config, progress=False)
    assert len(found.detectors) == 6 and list(found.detectors[0].per_group) == ["alpha", "beta", "gamma"]
    assert repr(found) == repr(expected)  # repr: every float to the last bit, NaN equal to NaN
    lf, ls = found.best.fusion_layer, found.best.safety_layer
    alone = score_detectors_on_cluster(client, store, index, config, lf, ls, ("lsi", "logreg_plain"), progress=False)
    assert repr(alone) == repr(found.detectors[:2])
    holding = client.run(lambda dask_worker: EVAL_DATA_PLUGIN in dask_worker.plugins)
    assert len(holding) == WORKERS and not any(holding.values())  # the states are released afterwards


def test_held_out_refits_on_the_cluster_equal_the_in_process_ones(
    client: Client, synthetic_store: tuple[ActivationStore, pl.DataFrame, np.ndarray]
) -> None:
    store, index, refusal = synthetic_store
    calibration, sources = CalibrateConfig(), ["alpha", "beta", "gamma"]
    bootstrap = BootstrapSpec(resamples=50, seed=3)  # the intervals too are computed on the workers
    with workers_thread_count():
        data = load_eval_data(index, store, refusal)
        expected = held_out_results(data, CONFIG, calibration, 3, 1, sources, ("lsi", 0.5), bootstrap)
    found = held_out_results_on_cluster(
        client, store, index, refusal, CONFIG, calibration, 3, 1, sources, ("lsi", 0.5), bootstrap
    )
    assert list(found.metrics) == sources and "refusal_direction" in found.metrics["beta"]
    assert "auroc_low" in found.metrics["beta"]["lsi"]
    assert repr(found.metrics) == repr(expected.metrics)  # repr: every float to the last bit, NaN equal to NaN
    assert repr(found.scores) == repr(expected.scores) and repr(found.labels) == repr(expected.labels)


def test_the_workers_share_the_cores(client: Client) -> None:
    def pools() -> tuple[int, list[int], str | None]:
        threads = [pool["num_threads"] for pool in threadpool_info()]
        return torch.get_num_threads(), threads, os.environ.get("MALLOC_TRIM_THRESHOLD_")

    share = core_share(available_cores(), WORKERS)
    for torch_threads, blas_threads, trim in client.run(pools).values():
        assert torch_threads == share and set(blas_threads) <= {share}
        assert trim is None  # glibc's own malloc thresholds, not Dask's (see local_cluster)


@pytest.mark.parametrize(("cores", "threads", "share"), [(2, 2, 1), (16, 4, 4), (2, 4, 1), (8, 3, 2), (4, 0, 4)])
def test_core_share(cores: int, threads: int, share: int) -> None:
    assert core_share(cores, threads) == share


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_scheduler_that_does_not_answer_is_named() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match=rf"cluster.address {address}: no Dask scheduler answered within 1 s"):
        with cluster_client(ClusterConfig(address=address, connect_timeout_s=1)):
            pass


def test_no_address_means_in_process() -> None:
    with cluster_client(ClusterConfig()) as connected:
        assert connected is None


@pytest.mark.parametrize(
    "address", ["", "auto", "local:1", "local:16", "tcp://10.0.0.5:8786", "tls://scheduler", "tcp://[::1]:8786"]
)
def test_cluster_addresses_accepted(address: str) -> None:
    assert ClusterConfig(address=address).address == address


@pytest.mark.parametrize(
    "address", ["local:0", "local", "local:two", "10.0.0.5:8786", "http://h:8786", "tcp://h:8786/x", 3]
)
def test_cluster_addresses_refused(address: object) -> None:
    with pytest.raises(ConfigError, match=r"cluster.address: expected (text|'auto', '' \(in process\), 'local:N')"):
        ClusterConfig(address=address)  # type: ignore[arg-type]


def test_the_cluster_reruns_no_stage() -> None:
    """Results do not depend on where they are computed, so no stage lists the cluster section as a param."""
    from ruamel.yaml import YAML

    stages = YAML(typ="safe").load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    listed = [
        (name, p) for name, stage in stages.items() for p in stage.get("params", []) if str(p).startswith("cluster")
    ]
    assert listed == []
