"""The benchmarks' interleaved rounds: ratios pair the arms of one round, and report the median and range."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from types import ModuleType

import pytest

from tests.paths import PROJECT_ROOT


def bench_module(name: str) -> ModuleType:
    """A script of ``bench/`` imported as a module (they are scripts, not a package)."""
    path = PROJECT_ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def serve() -> ModuleType:
    pytest.importorskip("httpx", reason="bench/serve.py needs the serve extra")
    return bench_module("serve")


def test_a_serve_ratio_pairs_servers_within_a_round_and_reports_the_median_and_range(serve: ModuleType) -> None:
    def level(round_: int, max_batch: int, reuse: bool, requests_per_s: float):  # type: ignore[no-untyped-def]
        return serve.Level(
            setup="upstream", round=round_, max_batch=max_batch, prefix_reuse=reuse, clients=64, requests=256,
            seconds=1.0, requests_per_s=requests_per_s, p50_s=0.0, p95_s=0.0, p99_s=0.0, check_share=0.0,
            errors=0, lost=0, duplicated=0, refused=0,
        )  # fmt: skip

    # Round 1 is slow for every server (load from elsewhere): its ratio is still 1.5.
    levels = [
        level(0, 16, True, 15.0), level(0, 16, False, 10.0),
        level(1, 16, False, 4.0), level(1, 16, True, 6.0),
        level(2, 16, True, 12.0), level(2, 16, False, 10.0),
    ]  # fmt: skip
    table = serve.ratios(levels, 16, (16, False))
    assert table == {"upstream": {"64": {"median": 1.5, "min": 1.2, "max": 1.5, "rounds": [1.5, 1.5, 1.2]}}}
    # Pairing across rounds instead (round 0's reuse against round 1's without) would say 3.75.
    assert serve.describe(table["upstream"]) == "64 clients: 1.50x (1.20-1.50)"
    with pytest.raises(ValueError, match="'upstream', 3, 64"):  # a round without its baseline: an error
        serve.ratios([*levels, replace(levels[0], round=3)], 16, (16, False))


def test_prefix_reuse_rotates_the_order_of_its_arms_per_round() -> None:
    prefix_reuse = bench_module("prefix_reuse")
    arms = ["off", "start", "on"]
    assert [prefix_reuse.rotated(arms, r) for r in range(4)] == [
        ["off", "start", "on"],
        ["start", "on", "off"],
        ["on", "off", "start"],
        ["off", "start", "on"],
    ]
    assert prefix_reuse.spread([1.0, 3.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "rounds": [1.0, 3.0, 2.0]}
