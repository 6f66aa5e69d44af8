"""DVC stage ``report``: one self-contained HTML page for the run.

    python -m stages.report demo demo          # data/report/demo/report.html, with the demo comparison
    python -m stages.report dev demo dev       # data/report/dev/report.html, with both comparisons

The first argument names the report (its folder under ``data/report/``); the others are the
comparison suites to include (their ``data/compare/<suite>/`` outputs must exist). The page holds
the configuration (``params.yaml`` and the facts that decide the numbers), the detector table,
the held-out-source table, ROC curves, reliability and layer-sweep heatmaps when present, the
comparison tables with a chart, and example refusals and answers. The chart is also written as a
PNG beside the page.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Params, load_params
from pipeline.detect.calibration import load_calibration
from pipeline.evaluate.plots import plot_defences
from pipeline.evaluate.report import ReportInputs, SuiteResult, order_summary, render_report
from pipeline.io import jsonl_lines, replace_dir_atomic, write_text_atomic
from pipeline.layout import (
    CALIBRATION,
    EVAL_DIR,
    EVAL_METRICS,
    PARAMS,
    PROBE_DIR,
    REPORT_ROOT,
    SWEEP_DIR,
    compare_dir,
    require,
)
from stages import run_record, run_stage

OUT_ROOT = REPORT_ROOT
FIGURES: tuple[tuple[str, Path], ...] = (
    ("ROC curves of LSI and every baseline on the test split", EVAL_DIR / "roc.png"),
    ("Reliability of the LSI score on the test split", EVAL_DIR / "reliability.png"),
    (
        "Layer sweep: mean AUROC on held-out sources' validation rows, per (fusion, safety) pair",
        SWEEP_DIR / "held_out_auroc.png",
    ),
    ("Layer sweep: in-source validation AUROC per (fusion, safety) pair", SWEEP_DIR / "val_auroc.png"),
)
EMBEDDED_NOTE = (
    "This run uses the embedded default model (SmolLM2-135M-Instruct reading images through OCR). It is not a "
    "vision-language model and its own safety behaviour is minimal: read these numbers as a check of the "
    "machinery, not as evidence about LSI or ECSO on real VLMs."
)


def _json(path: Path) -> Any:
    """A JSON file's content; a missing one is a clear error naming the stage that writes it."""
    return json.loads(require(path, "the stage that writes it (dvc repro)").read_text(encoding="utf-8"))


def load_suite_result(suite: str, figure_dir: Path) -> SuiteResult:
    """One suite's comparison outputs, with its chart drawn into ``figure_dir``."""
    folder = compare_dir(suite)
    summary = _json(folder / "summary.json")
    rows_path = require(folder / "rows.jsonl", f"python -m stages.compare {suite}")
    rows = [json.loads(line) for line in jsonl_lines(rows_path.read_text(encoding="utf-8")) if line.strip()]
    benchmarks = order_summary(summary.pop("benchmarks"))
    figure = figure_dir / f"comparison_{suite}.png"
    plot_defences(benchmarks, figure, f"Defences on the {suite} suite ({summary['judge']} judge)")
    return SuiteResult(name=suite, meta=summary, summary=benchmarks, rows=rows, figure=figure)


def run_facts(params: Params) -> list[tuple[str, str]]:
    """The facts that decide what the run's numbers mean, for the page's configuration table."""
    probe = _json(PROBE_DIR / "probe.json")
    provenance = probe.get("store_provenance", {})
    calibration = load_calibration(CALIBRATION)
    judge = params.compare.judge
    lsi_pair = f"fusion {probe['fusion_layer']} / safety {probe['safety_layer']}"
    reads = ", ".join(probe.get("pieces") or []) or lsi_pair
    return [
        ("model", f"{provenance.get('model_name', '?')} (revision {provenance.get('model_revision', '?')})"),
        ("model kind / path", f"{params.model.kind} / {params.model.path}"),
        (
            "framings",
            f"{params.prompts.benign!r} / {params.prompts.malicious!r}, {params.prompts.position} the request",
        ),
        ("stored layers", ", ".join(str(layer) for layer in provenance.get("layers", []))),
        (
            "shipped detector",
            f"{probe.get('detector', 'lsi')} (guard.detector: {params.guard.detector}), reads {reads}; "
            f"held-out-source AUROC {_number(probe.get('held_out_auroc'))}",
        ),
        (
            "LSI layers",
            f"fusion {probe['fusion_layer']}, safety {probe['safety_layer']} (train: "
            f"{params.train.fusion_layer} / {params.train.safety_layer})",
        ),
        (
            "tau",
            f"{calibration.tau:.4f} ({calibration.method}, target FPR {calibration.target_fpr}, "
            f"calibration FPR {calibration.calib_fpr:.3f})",
        ),
        ("request sources", ", ".join(params.prepare.sources)),
        (
            "guard",
            f"policy {params.guard.policy}, ECSO margin {params.guard.ecso_margin}, on error {params.guard.on_error}",
        ),
        ("ECSO decoding", str(params.ecso.decoding)),
        ("judge", judge.kind + (f" ({judge.model or judge.model_path})" if judge.kind != "refusal_phrases" else "")),
        ("store", f"{provenance.get('store_dtype', '?')}, code version {provenance.get('code_version', '?')}"),
    ]


def _number(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f}"


def build_inputs(name: str, suites: Sequence[str], params: Params, out: Path) -> ReportInputs:
    """Everything the page shows, read from the run's outputs."""
    metrics = _json(EVAL_METRICS) if EVAL_METRICS.is_file() else {}
    notes = [EMBEDDED_NOTE] if params.model.kind == "embedded" else []
    for suite in suites:
        if any(spec.kind == "prepared" for spec in params.compare.suite(suite)):
            notes.append(
                f"The {suite} suite holds the test split of the probe's own training sources: its LSI numbers are "
                "in-source. Benchmarks from other sources show what a new source will see."
            )
    model = _json(PROBE_DIR / "probe.json").get("store_provenance", {})
    run = run_record(str(model.get("model_name", "unknown")), str(model.get("model_revision", "unknown")), "cpu")
    return ReportInputs(
        title=f"LSI-Guard run report: {name}",
        params_text=PARAMS.read_text(encoding="utf-8"),
        facts=run_facts(params),
        detectors=metrics.get("detectors", {}),
        cross_source=metrics.get("cross_source", {}),
        paired=metrics.get("paired", {}),
        intervals=metrics.get("intervals", {}),
        suites=[load_suite_result(suite, out) for suite in suites],
        figures=[(caption, path) for caption, path in FIGURES if path.is_file()],
        notes=notes,
        run=run,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Write ``data/report/<name>/report.html`` for the suites named."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m stages.report NAME [SUITE ...]")
    name, suites = args[0], args[1:]
    params = load_params(PARAMS)
    for suite in suites:
        params.compare.suite(suite)  # an unknown suite is refused before any work
    out = OUT_ROOT / name
    # Built beside data/report/<name> and swapped in whole (persist: true in dvc.yaml).
    with replace_dir_atomic(out) as staging:
        inputs = build_inputs(name, suites, params, staging)
        write_text_atomic(staging / "report.html", render_report(inputs, params.compare.examples_in_report))
    page = out / "report.html"
    print(f"report: {page} ({page.stat().st_size // 1024} KiB); open it in a browser")


if __name__ == "__main__":
    run_stage(main)
