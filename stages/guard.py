"""DVC stage ``guard``: LSI-guarded generation on a balanced sample of the test split.

Writes ``data/guard/responses.jsonl`` (one line per sampled request) and
``data/guard/summary.json`` (refusal rates per label, for ``dvc metrics``).

The sampling, batching and atomic-write helpers here are shared with ``stages.ecso`` so both
defences are shown the same kind of sample.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import load_params
from pipeline.guard import Guard, GuardedResponse
from pipeline.probe import load_probe
from stages.common import (
    BATCH_SIZE,
    BENIGN,
    CALIBRATION,
    HARMFUL,
    INDEX,
    PARAMS,
    PROBE_DIR,
    balanced_test_sample,
    batches,
    rate,
    row_fields,
    row_request,
    run_stage,
    write_json_atomic,
    write_jsonl_atomic,
)

OUT_DIR = Path("data/guard")


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
        records.extend(guard_record(row, response) for row, response in zip(batch, responses, strict=True))

    write_jsonl_atomic(OUT_DIR / "responses.jsonl", records)
    summary = guard_summary(records)
    write_json_atomic(OUT_DIR / "summary.json", summary)
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    run_stage(main)
