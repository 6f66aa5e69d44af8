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
    detectors = json.loads(metrics.read_text())["detectors"]
    print(f"\n{'detector':18s} {'AUROC':>6s} {'AUPRC':>6s} {'TPR@5%':>7s} {'F1@tau':>7s} {'FPR@tau':>8s}")
    for name, row in detectors.items():
        print(f"{name:18s} {row['auroc']:6.3f} {row['auprc']:6.3f} {row['tpr_at_5pct_fpr']:7.3f} {row['f1']:7.3f} {row['fpr']:8.3f}")
    cross = json.loads(metrics.read_text())["cross_source"]
    if cross:
        print("\nheld-out sources (AUROC on all their rows; data/eval/comparison.md has everything)")
        for source, rows in cross.items():
            cells = "  ".join(f"{n} {rows[n]['all_rows']['auroc']:.3f}" for n in ("lsi", "length_only", "style_only"))
            print(f"  {source:14s} {cells}")
comparison = Path("data/compare/demo/comparison.md")
if comparison.is_file():
    table = comparison.read_text().split("\n\n")[0]
    print(f"\ndefence comparison on the demo suite ({comparison.parent}):\n{table}")
report = Path("data/report/demo/report.html")
if report.is_file():
    print(f"\nreport: {report.resolve()} (open it in a browser)")
print("outputs: data/eval (metrics, comparison, ROC), data/sweep, data/guard, data/ecso, data/attribution, data/compare")
PY
