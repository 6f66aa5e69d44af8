"""``cluster.address: auto``: which stages get a local cluster, and when it falls back to in process."""

from __future__ import annotations

import pytest

from pipeline.config import ClusterConfig
from pipeline.detect import cluster_open
from pipeline.detect.cluster_open import auto_address, open_cluster, resolve_cluster


@pytest.mark.parametrize(
    ("with_model", "cores", "distributed_installed", "expected"),
    [
        (False, 2, True, "local:2"),  # the sweep and the refits: one single-threaded worker per core
        (False, 16, True, "local:16"),
        (True, 16, True, ""),  # a model's forward passes already use every core in one process
        (False, 1, True, ""),  # one core: a worker process would only add start-up and copying
        (False, 8, False, ""),  # without the 'cluster' extra: in process, not an error
    ],
)
def test_auto_address(with_model: bool, cores: int, distributed_installed: bool, expected: str) -> None:
    assert auto_address(with_model=with_model, cores=cores, distributed_installed=distributed_installed) == expected


def test_resolve_makes_auto_concrete_and_leaves_other_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_open, "available_cores", lambda: 3)
    monkeypatch.setattr(cluster_open, "installed", lambda module: module == "distributed")
    auto = ClusterConfig(address="auto", connect_timeout_s=7)
    assert resolve_cluster(auto, with_model=False) == ClusterConfig(address="local:3", connect_timeout_s=7)
    assert resolve_cluster(auto, with_model=True).address == ""
    for address in ("", "local:1", "tcp://10.0.0.5:8786"):
        config = ClusterConfig(address=address)
        assert resolve_cluster(config, with_model=False) is config


def test_an_unresolved_auto_is_refused() -> None:
    with pytest.raises(ValueError, match="resolve_cluster"):
        with open_cluster(ClusterConfig(address="auto")):
            pass
