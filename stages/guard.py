"""DVC stage ``guard``: LSI-guarded generation on a balanced sample of the test split.

Writes ``data/guard/responses.jsonl`` (one line per sampled request) and
``data/guard/summary.json`` (refusal rates per label, for ``dvc metrics``).

The sampling, batching and atomic-write helpers here are shared with ``stages.ecso`` so both
defences are shown the same kind of sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import polars as pl
from tqdm import tqdm

from pipeline.config import load_params
from pipeline.guard import Guard, GuardedResponse
from pipeline.models.base import Request
from pipeline.probe import load_probe
from stages.common import run_stage, write_json_atomic, write_jsonl_atomic

PARAMS = Path("params.yaml")
INDEX = Path("data/prepared/index.parquet")
PROBE_DIR = Path("data/probe")
CALIBRATION = Path("data/calibration/calibration.json")
OUT_DIR = Path("data/guard")

# Generation holds a KV cache per request; a small batch keeps memory flat on a laptop or a GPU.
BATCH_SIZE = 4

HARMFUL, BENIGN = 1, 0

T = TypeVar("T")


def balanced_test_sample(index: pl.DataFrame, sample_size: int, seed: int) -> pl.DataFrame:
    """A deterministic sample of test-split rows, half harmful and half benign, sorted by ``row_id``.

    Rows are sorted by ``row_id`` before drawing so the sample does not depend on the index's
    row order. Harmful gets the odd row out. When one label has too few rows, the other fills
    the gap, so the sample is as large as the test split allows.
    """
    if sample_size < 1:
        raise ValueError(f"sample_size must be at least 1, got {sample_size}")
    test = index.filter(pl.col("split") == "test").sort("row_id")
    if test.height == 0:
        raise ValueError("the index has no test-split rows to sample from")
    rng = np.random.default_rng(seed)
    ids = {label: test.filter(pl.col("label") == label)["row_id"].to_numpy() for label in (HARMFUL, BENIGN)}
    shuffled = {label: ids[label][rng.permutation(len(ids[label]))] for label in (HARMFUL, BENIGN)}
    quota = {HARMFUL: (sample_size + 1) // 2, BENIGN: sample_size // 2}
    take = {label: min(quota[label], len(ids[label])) for label in (HARMFUL, BENIGN)}
    shortfall = sample_size - sum(take.values())
    for label in (HARMFUL, BENIGN):
        extra = min(shortfall, len(ids[label]) - take[label])
        take[label] += extra
        shortfall -= extra
    chosen = np.concatenate([shuffled[label][: take[label]] for label in (HARMFUL, BENIGN)])
    return test.filter(pl.col("row_id").is_in(chosen.tolist())).sort("row_id")


def row_request(row: Mapping[str, Any]) -> Request:
    """The model request for one index row (image path as stored, or none)."""
    image = row.get("image_path")
    return Request(text=str(row["text"]), image=Path(image) if image else None)


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def row_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The index columns every output line repeats, so a line can be read on its own."""
    return {key: row.get(key) for key in ("row_id", "label", "category", "text", "image_path")}


def guard_record(row: Mapping[str, Any], guarded: GuardedResponse) -> dict[str, Any]:
    """One ``responses.jsonl`` line."""
    decision = guarded.decision
    return {
        **row_fields(row),
        "score": decision.score,
        "tau": decision.tau,
        "refused": decision.refused,
        "reason": decision.reason,
        "response": guarded.response,
    }


def rate(records: Sequence[Mapping[str, Any]], key: str, label: int) -> float | None:
    """Fraction of records with ``label`` whose ``key`` is true; None (JSON null) when there are none."""
    values = [bool(r[key]) for r in records if r["label"] == label]
    return sum(values) / len(values) if values else None


def guard_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Refusal rates per label: harmful should be refused, benign should not."""
    return {
        "n": len(records),
        "n_harmful": sum(r["label"] == HARMFUL for r in records),
        "n_benign": sum(r["label"] == BENIGN for r in records),
        "refusal_rate_harmful": rate(records, "refused", HARMFUL),
        "refusal_rate_benign": rate(records, "refused", BENIGN),
    }


def main() -> None:
    """Sample, guard, write."""
    # Imported here so the pure helpers above load without the model stack.
    from pipeline.calibration import load_calibration
    from pipeline.dataset import read_index
    from pipeline.models.registry import load_adapter

    params = load_params(PARAMS)
    sample = balanced_test_sample(read_index(INDEX), params.guard.sample_size, params.guard.seed)
    probe, meta = load_probe(PROBE_DIR)
    calibration = load_calibration(CALIBRATION)
    guard = Guard(
        load_adapter(params.model), probe, meta, calibration.tau, params.prompts, params.guard.refusal_message
    )

    rows = sample.to_dicts()
    records: list[dict[str, Any]] = []
    for batch in tqdm(list(batches(rows, BATCH_SIZE)), desc="guard", unit="batch"):
        responses = guard.generate([row_request(row) for row in batch], params.guard.max_new_tokens)
        records.extend(guard_record(row, response) for row, response in zip(batch, responses))

    write_jsonl_atomic(OUT_DIR / "responses.jsonl", records)
    summary = guard_summary(records)
    write_json_atomic(OUT_DIR / "summary.json", summary)
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    run_stage(main)
