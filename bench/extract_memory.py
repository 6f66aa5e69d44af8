"""Extraction memory: peak resident memory of extracting N examples, for a small and a large N, same run.

Each size runs in a fresh Python process (``--child``) that extracts that many requests on the
default model into a temporary store and reports its own peak RSS. Requests cycle through the
prepared demo index (the OCR cache is warmed first, so the OCR engine is not loaded in either
run). A flat footprint means the ratio large/small stays near 1.

    python bench/extract_memory.py --sizes 200 2000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path("bench/results")


def child(count: int) -> None:
    """Extract ``count`` requests into a temporary store; print peak RSS (MiB) and seconds as JSON."""
    import polars as pl

    from pipeline.config import load_params
    from pipeline.data.index import read_index
    from pipeline.detect.extraction import extract_to_store
    from pipeline.layout import INDEX
    from pipeline.models.registry import load_adapter

    params = load_params()
    index = read_index(INDEX).sort("row_id")
    repeats = -(-count // len(index))
    big = pl.concat([index] * repeats).head(count).with_columns(pl.int_range(count, dtype=pl.Int64).alias("row_id"))
    adapter = load_adapter(params.model)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        extract_to_store(adapter, big, params.prompts, params.extract, Path(tmp) / "store.zarr", progress=False)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"examples": count, "peak_rss_mib": peak_mib, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "extract-memory.json")
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return

    runs = []
    for size in args.sizes:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(size)], check=True, capture_output=True, text=True
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{size:6d} examples: peak RSS {runs[-1]['peak_rss_mib']:8.1f} MiB in {runs[-1]['seconds']:7.1f} s")
    ratio = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    print(f"peak RSS ratio {args.sizes[-1]} / {args.sizes[0]} examples: {ratio:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "ratio_largest_to_smallest": ratio}, indent=2))


if __name__ == "__main__":
    main()
