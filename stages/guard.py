"""DVC stage ``guard``: guarded generation, under ``guard.policy``, on a balanced sample of the test split.

Writes ``data/guard/responses.jsonl`` (one line per sampled request: decision, answer, ECSO's
steps when it ran, timings) and ``data/guard/summary.json`` (refusal and ECSO rates per label,
each with its Wilson interval, for ``dvc metrics``). The sample is drawn as the ``ecso`` stage
draws its own, so both defences are shown the same kind of sample.
"""

from __future__ import annotations

import json
from typing import Any

from tqdm import tqdm

from pipeline.config import load_params
from pipeline.data.index import read_index
from pipeline.data.rows import balanced_test_sample
from pipeline.defend.guard import Guard
from pipeline.defend.records import GUARD_RATES, guard_record, guard_summary
from pipeline.detect.extraction import row_request
from pipeline.evaluate.intervals import wilson_fields
from pipeline.io import write_json_atomic, write_jsonl_atomic
from pipeline.layout import GUARD_DIR, INDEX, PARAMS
from pipeline.models.base import resolve_device
from stages import run_record, run_stage

OUT_DIR = GUARD_DIR


def main() -> None:
    """Sample, guard each request under the configured policy, write."""
    params = load_params(PARAMS)
    sample = balanced_test_sample(read_index(INDEX), params.guard.sample_size, params.guard.seed)
    guard = Guard.from_run(".")

    records: list[dict[str, Any]] = []
    for row in tqdm(sample.to_dicts(), desc=f"guard ({params.guard.policy})", unit="req"):
        request = row_request(row)
        records.append(guard_record(row, guard.generate(request.image, request.text)))

    write_jsonl_atomic(OUT_DIR / "responses.jsonl", records)
    # Each rate with its Wilson interval (<rate>_low / <rate>_high) at evaluate.confidence.
    summary = wilson_fields(guard_summary(records, params.guard.policy), GUARD_RATES, params.evaluate.confidence)
    run = run_record(guard.adapter.info.name, guard.adapter.info.revision, str(resolve_device(params.model.device)))
    write_json_atomic(OUT_DIR / "summary.json", {**summary, "run": run})
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    run_stage(main)
