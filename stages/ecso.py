"""DVC stage ``ecso``: the ECSO baseline on a balanced sample of the test split.

Writes ``data/ecso/records.jsonl`` (every step's output per request) and
``data/ecso/summary.json`` (how often each label was judged harmful and how often the answer
changed, each with its Wilson interval, for ``dvc metrics``).
"""

from __future__ import annotations

import json
from typing import Any

from tqdm import tqdm

from pipeline.config import load_params
from pipeline.data.index import read_index
from pipeline.data.rows import balanced_test_sample, batches
from pipeline.defend.ecso import ECSO
from pipeline.defend.records import ECSO_RATES, ecso_record, ecso_summary
from pipeline.detect.extraction import row_request
from pipeline.evaluate.intervals import wilson_fields
from pipeline.io import write_json_atomic, write_jsonl_atomic
from pipeline.layout import ECSO_DIR, INDEX, PARAMS
from pipeline.models.base import resolve_device
from pipeline.models.registry import load_adapter
from stages import run_record, run_stage

OUT_DIR = ECSO_DIR

# Generation holds a KV cache per request; a small batch keeps memory flat on a laptop or a GPU.
BATCH_SIZE = 4


def main() -> None:
    """Sample, run ECSO, write."""
    params = load_params(PARAMS)
    sample = balanced_test_sample(read_index(INDEX), params.ecso.sample_size, params.ecso.seed)
    ecso = ECSO(load_adapter(params.model, params.limits.max_request_tokens), params.ecso)

    rows = sample.to_dicts()
    records: list[dict[str, Any]] = []
    for batch in tqdm(list(batches(rows, BATCH_SIZE)), desc="ecso", unit="batch"):
        results = ecso.run([row_request(row) for row in batch])
        records.extend(ecso_record(row, result) for row, result in zip(batch, results, strict=True))

    write_jsonl_atomic(OUT_DIR / "records.jsonl", records)
    # Each rate with its Wilson interval (<rate>_low / <rate>_high) at evaluate.confidence.
    summary = wilson_fields(ecso_summary(records), ECSO_RATES, params.evaluate.confidence)
    run = run_record(ecso.adapter.info.name, ecso.adapter.info.revision, str(resolve_device(params.model.device)))
    write_json_atomic(OUT_DIR / "summary.json", {**summary, "run": run})
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    run_stage(main)
