#!/usr/bin/env bash
# Run the whole LSI-Guard study (dvc repro) on the embedded default model and the demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
# DVC needs a git repository; a tarball checkout gets a fresh one.
[ -d .git ] || git init -q
[ -d .dvc ] || dvc init -q
dvc repro "$@"
# A short summary; `dvc metrics show` and `dvc plots show` give everything.
python - <<'PY'
import json
from pathlib import Path

metrics = Path("data/eval/metrics.json")
if metrics.is_file():
    data = json.loads(metrics.read_text())
    shipped = data["shipped"]
    print(f"\nshipped detector: {shipped['describe']} (guard.detector in params.yaml)")
    print(f"\nin-source test split\n{'detector':18s} {'AUROC':>6s} {'AUPRC':>6s} {'TPR@5%':>7s} {'F1@tau':>7s} {'FPR@tau':>8s}")
    for name, row in data["detectors"].items():
        print(f"{name:18s} {row['auroc']:6.3f} {row['auprc']:6.3f} {row['tpr_at_5pct_fpr']:7.3f} {row['f1']:7.3f} {row['fpr']:8.3f}")
    summary = data.get("held_out_summary") or {}
    by = data.get("held_out_by", "upstream")
    if summary:
        print(f"\nheld out by {by}, each left out in turn (data/eval/comparison.md has every cell and the other groupings)")
        print(f"{'detector':18s} {'mean AUROC':>10s} {'min AUROC':>9s} {'max FPR@tau':>11s}")
        for name, row in summary.items():
            mark = "  <- shipped" if name == shipped["detector"] else ""
            print(f"{name:18s} {row['mean_auroc']:10.3f} {row['min_auroc']:9.3f} {row['max_fpr']:11.3f}{mark}")
        cells = summary.get(shipped["detector"], {}).get("per_group", {})
        if cells and all("fpr_at_shipped_tau" in c for c in cells.values()):
            print(f"\nshipped {shipped['detector']} at the run's tau, per held-out {by}: AUROC, TPR@5%FPR, "
                  "its own harmful refused / benign flagged (- where it has none)")
            show = lambda v: "   -" if v is None or v != v else f"{v:4.2f}"
            for group, c in cells.items():
                print(f"  {group:32s} {c['auroc']:.3f}  {c['tpr_at_5pct_fpr']:.2f}  "
                      f"{show(c['tpr_at_shipped_tau'])} / {show(c['fpr_at_shipped_tau'])}")
sanity = Path("data/sanity/metrics.json")
if sanity.is_file():
    s = json.loads(sanity.read_text())
    print(
        f"\neveryday sanity set (never trained on): accuracy {s['accuracy']:.3f}, harmful refused "
        f"{s['harmful_refused']:.3f}, benign answered {s['benign_answered']:.3f} (data/sanity/rows.jsonl)"
    )
comparison = Path("data/compare/demo/comparison.md")
if comparison.is_file():
    table = comparison.read_text().split("\n\n")[0]
    print(f"\ndefence comparison on the demo suite ({comparison.parent}):\n{table}")
report = Path("data/report/demo/report.html")
if report.is_file():
    print(f"\nreport: {report.resolve()} (open it in a browser)")
print("outputs: data/eval (metrics, comparison, ROC), data/sweep, data/guard, data/ecso, data/attribution, data/compare")
PY
