"""DVC stage ``compare``: no defence, LSI, ECSO and LSI then ECSO on one suite of benchmarks.

    python -m stages.compare demo    # the demo data's test split (dvc.yaml)
    python -m stages.compare dev     # the benchmark files in ../shared/benchmarks (dev/dvc.yaml)

The suite's benchmarks come from ``compare.suites.<name>`` in ``params.yaml``; the guard is the
run's (probe, tau, model). Writes, under ``data/compare/<suite>/``:

- ``rows.jsonl``: every defence's response to every example, its judge verdict, the LSI score
  and reason, every ECSO step and the timed parts;
- ``metrics.json``: refusal, harmless and benign-answer rates, ECSO use and added latency per
  benchmark and defence (for ``dvc metrics``); ``summary.json`` adds the per-category numbers;
- ``comparison.md``: the same as tables.

A long run keeps what it finished: each batch is appended to ``data/compare/<suite>.partial.jsonl``
(beside the output folder, which DVC empties before a run) and a rerun with the same setup
continues after the last whole batch. A different setup (params, probe, tau, examples) is refused,
naming the file to delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from pipeline.config import CompareConfig, ConfigError, Params, load_params
from pipeline.errors import LSIGuardError
from pipeline.evaluate.comparison import ComparisonRow
from pipeline.io import write_text_atomic
from stages.common import CALIBRATION, PARAMS, PROBE_DIR, run_stage, write_json_atomic, write_jsonl_atomic

OUT_ROOT = Path("data/compare")
RENDER_ROOT = Path("data/cache/render")
PARTIAL_SUFFIX = ".partial.jsonl"


class ResumeMismatch(LSIGuardError, ValueError):
    """A partial comparison file written under another setup."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(params: Params, suite: str, example_keys: Sequence[str], tau: float, probe_sha256: str) -> str:
    """sha256 of everything that decides a comparison row: settings, probe, tau, the examples drawn."""
    compare = asdict(params.compare)
    compare.pop("examples_in_report")  # report-only
    compare["suites"] = [s for s in compare["suites"] if s[0] == suite]
    blob = json.dumps(
        {
            "compare": compare,
            "model": asdict(params.model),
            "prompts": asdict(params.prompts),
            "guard": asdict(params.guard),
            "ecso": asdict(params.ecso),
            "tau": tau,
            "probe": probe_sha256,
            "examples": list(example_keys),
            # A partial file from code whose rows have other fields cannot be resumed.
            "row_fields": [f.name for f in fields(ComparisonRow)],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_partial(path: Path, expected: str) -> list[dict[str, Any]]:
    """The rows a killed run left in ``path`` (none if absent), after checking its setup matches.

    A last line cut off mid-write is dropped, so is the batch it belonged to (rows are written a
    whole batch per write, so that batch is recomputed).
    """
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("fingerprint") != expected:
        raise ResumeMismatch(
            f"{path}: left by a comparison run under a different setup (params, probe, tau or examples); "
            "delete it to start over"
        )
    records: list[dict[str, Any]] = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the torn tail of a killed write; everything after it is incomplete too
    return records


def append_rows(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append one batch's rows in a single write and sync it, so a kill loses at most this batch."""
    with path.open("a", encoding="utf-8") as file:
        file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        file.flush()
        os.fsync(file.fileno())


def done_examples(records: Sequence[dict[str, Any]], defences: Sequence[str]) -> set[tuple[str, str]]:
    """(benchmark, example_id) of every example that has a row for every defence."""
    seen: dict[tuple[str, str], set[str]] = {}
    for record in records:
        seen.setdefault((record["benchmark"], record["example_id"]), set()).add(record["defence"])
    return {key for key, have in seen.items() if have >= set(defences)}


def compact_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without its per-category tables: what ``dvc metrics show`` prints stays readable."""
    return {
        benchmark: {defence: {k: v for k, v in m.items() if k != "per_category"} for defence, m in defences.items()}
        for benchmark, defences in summary.items()
    }


def run_suite(suite: str, params: Params, out_root: Path = OUT_ROOT) -> dict[str, Any]:
    """Load the suite, run every defence on it (resuming a killed run), write its outputs; the summary."""
    from pipeline.data.benchmarks.suites import check_suites, load_suite
    from pipeline.defend.guard import Guard
    from pipeline.detect.calibration import load_calibration
    from pipeline.evaluate.comparison import comparison_markdown, iter_comparison, summarise
    from pipeline.evaluate.judges import build_judge

    config: CompareConfig = params.compare
    check_suites(config)
    specs = config.suite(suite)
    # Load and validate every benchmark before the model: a bad file costs seconds, not a model load.
    examples = load_suite(specs, config.seed, RENDER_ROOT)
    keys = [f"{example.benchmark}/{example.example_id}" for example in examples]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"compare.suites.{suite}: two benchmarks yield the same example ids; rename one")
    print(f"{suite}: {len(examples)} examples from {len(specs)} benchmark(s)", file=sys.stderr)

    tau = load_calibration(CALIBRATION).tau
    partial = out_root / f"{suite}{PARTIAL_SUFFIX}"
    expected = fingerprint(params, suite, keys, tau, _sha256(PROBE_DIR / "probe.safetensors"))
    records = read_partial(partial, expected)
    finished = done_examples(records, config.defences)
    records = [r for r in records if (r["benchmark"], r["example_id"]) in finished]
    todo = [e for e in examples if (e.benchmark, e.example_id) not in finished]
    if finished:
        print(f"{suite}: resuming, {len(finished)} examples already done in {partial}", file=sys.stderr)

    guard = Guard.from_run(".", max_new_tokens=config.max_new_tokens)
    judge = build_judge(config.judge, own_model=guard.adapter)
    # Rewritten in one atomic step (header, then the rows kept), so a kill here loses nothing either.
    header = json.dumps({"fingerprint": expected, "suite": suite}) + "\n"
    write_text_atomic(partial, header + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    for batch in iter_comparison(guard, todo, judge, config.defences, config.batch_size, config.max_new_tokens):
        batch_records = [row.record() for row in batch]
        append_rows(partial, batch_records)
        records.extend(batch_records)

    # Rows in suite order, then defence order, whatever order the batches and the resume gave.
    position = {key: i for i, key in enumerate(keys)}
    records.sort(key=lambda r: (position[f"{r['benchmark']}/{r['example_id']}"], config.defences.index(r["defence"])))
    rows = [ComparisonRow(**record) for record in records]
    summary = summarise(rows)
    meta = {
        "suite": suite,
        "judge": judge.name,
        "model": guard.adapter.info.name,
        "tau": tau,
        "fusion_layer": guard.meta.fusion_layer,
        "safety_layer": guard.meta.safety_layer,
        "defences": list(config.defences),
        "n_examples": {spec.name: sum(e.benchmark == spec.name for e in examples) for spec in specs},
    }
    out = out_root / suite
    write_jsonl_atomic(out / "rows.jsonl", records)
    write_json_atomic(out / "summary.json", {**meta, "benchmarks": summary})
    write_json_atomic(out / "metrics.json", {**meta, "benchmarks": compact_metrics(summary)})
    write_text_atomic(out / "comparison.md", comparison_markdown(summary))
    partial.unlink()
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Run the suite named on the command line (``demo`` by default) and print its tables."""
    from pipeline.evaluate.comparison import comparison_markdown

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1:
        raise SystemExit("usage: python -m stages.compare [SUITE]")
    suite = args[0] if args else "demo"
    summary = run_suite(suite, load_params(PARAMS))
    print(comparison_markdown(summary))


if __name__ == "__main__":
    run_stage(main)
