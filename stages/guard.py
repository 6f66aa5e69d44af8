"""DVC stage ``guard``: guarded generation, under ``guard.policy``, on a balanced sample of the test split.

Writes ``data/guard/responses.jsonl`` (one line per sampled request: decision, answer, ECSO's
steps when it ran, timings) and ``data/guard/summary.json`` (refusal and ECSO rates per label,
for ``dvc metrics``).

The balanced sample and the atomic writers come from ``stages.common``, shared with
``stages.ecso``, so both defences are shown the same kind of sample.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import load_params
from pipeline.defend.guard import Guard, GuardedResponse, response_record
from stages.common import (
    BENIGN,
    HARMFUL,
    INDEX,
    PARAMS,
    balanced_test_sample,
    rate,
    row_fields,
    row_request,
    run_stage,
    write_json_atomic,
    write_jsonl_atomic,
)

OUT_DIR = Path("data/guard")


def guard_record(row: Mapping[str, Any], guarded: GuardedResponse) -> dict[str, Any]:
    """One ``responses.jsonl`` line: the request, the decision, the answer, ECSO's steps and timings."""
    return {**row_fields(row), **response_record(guarded)}


def guard_summary(records: Sequence[Mapping[str, Any]], policy: str = "lsi") -> dict[str, Any]:
    """Per label: how often the guard refused outright and how often it sent the request to ECSO."""
    ecso = [{**r, "ecso_routed": r.get("action") == "ecso"} for r in records]
    seconds = [r["seconds"]["total"] for r in records if isinstance(r.get("seconds"), Mapping)]
    return {
        "policy": policy,
        "n": len(records),
        "n_harmful": sum(r["label"] == HARMFUL for r in records),
        "n_benign": sum(r["label"] == BENIGN for r in records),
        "refusal_rate_harmful": rate(records, "refused", HARMFUL),
        "refusal_rate_benign": rate(records, "refused", BENIGN),
        "ecso_rate_harmful": rate(ecso, "ecso_routed", HARMFUL),
        "ecso_rate_benign": rate(ecso, "ecso_routed", BENIGN),
        "check_errors": sum(r.get("error") is not None for r in records),
        "mean_seconds": sum(seconds) / len(seconds) if seconds else None,
    }


def main() -> None:
    """Sample, guard each request under the configured policy, write."""
    # Imported here so the pure helpers above load without the model stack.
    from pipeline.data.sources import read_index

    params = load_params(PARAMS)
    sample = balanced_test_sample(read_index(INDEX), params.guard.sample_size, params.guard.seed)
    guard = Guard.from_run(".")

    records: list[dict[str, Any]] = []
    for row in tqdm(sample.to_dicts(), desc=f"guard ({params.guard.policy})", unit="req"):
        request = row_request(row)
        records.append(guard_record(row, guard.generate(request.image, request.text)))

    write_jsonl_atomic(OUT_DIR / "responses.jsonl", records)
    summary = guard_summary(records, params.guard.policy)
    write_json_atomic(OUT_DIR / "summary.json", summary)
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    run_stage(main)
