"""DVC stage ``ecso``: the ECSO baseline on a balanced sample of the test split.

Writes ``data/ecso/records.jsonl`` (every step's output per request) and
``data/ecso/summary.json`` (how often each label was judged harmful and how often the answer
changed, for ``dvc metrics``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import load_params
from pipeline.defend.ecso import ECSO, ECSORecord
from stages.common import (
    BATCH_SIZE,
    BENIGN,
    HARMFUL,
    INDEX,
    PARAMS,
    balanced_test_sample,
    batches,
    rate,
    row_fields,
    row_request,
    run_stage,
    write_json_atomic,
    write_jsonl_atomic,
)

OUT_DIR = Path("data/ecso")


def ecso_record(row: Mapping[str, Any], record: ECSORecord) -> dict[str, Any]:
    """One ``records.jsonl`` line: the request and every ECSO step's output."""
    return {**row_fields(row), **asdict(record)}


def ecso_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How often the self-check fired per label, and how often the delivered answer changed."""
    return {
        "n": len(records),
        "n_harmful": sum(r["label"] == HARMFUL for r in records),
        "n_benign": sum(r["label"] == BENIGN for r in records),
        "judged_harmful_rate_harmful": rate(records, "judged_harmful", HARMFUL),
        "judged_harmful_rate_benign": rate(records, "judged_harmful", BENIGN),
        "changed_rate": sum(bool(r["changed"]) for r in records) / len(records) if records else None,
    }


def main() -> None:
    """Sample, run ECSO, write."""
    # Imported here so the pure helpers above load without the model stack.
    from pipeline.data.sources import read_index
    from pipeline.models.registry import load_adapter

    params = load_params(PARAMS)
    sample = balanced_test_sample(read_index(INDEX), params.ecso.sample_size, params.ecso.seed)
    ecso = ECSO(load_adapter(params.model), params.ecso)

    rows = sample.to_dicts()
    records: list[dict[str, Any]] = []
    for batch in tqdm(list(batches(rows, BATCH_SIZE)), desc="ecso", unit="batch"):
        results = ecso.run([row_request(row) for row in batch])
        records.extend(ecso_record(row, result) for row, result in zip(batch, results, strict=True))

    write_jsonl_atomic(OUT_DIR / "records.jsonl", records)
    summary = ecso_summary(records)
    write_json_atomic(OUT_DIR / "summary.json", summary)
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    run_stage(main)
