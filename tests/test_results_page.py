"""scripts/results_page.py: the documentation's results page, written from a run's metrics files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "results_page.py"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAN = float("nan")

REQUIRED = (
    "data/eval/metrics.json",
    "data/eval/comparison.md",
    "data/sweep/sweep.json",
    "data/calibration/metrics.json",
    "data/sanity/metrics.json",
    "data/guard/summary.json",
)


def run_record(commit: str = COMMIT, wall: float = 12.5) -> dict:
    return {
        "device": "cpu",
        "git_commit": commit,
        "git_dirty": False,
        "libraries": {"dvc": "3.0.0", "torch": "2.0.0", "transformers": "5.0.0", "zarr": "3.0.0"},
        "model_name": "TinyModel+OCR",
        "model_revision": "feedface",
        "project_version": "0.1.0",
        "python": "3.11.7",
        "wall_time_s": wall,
    }


def group(auroc: float, low: float, high: float, *, n: int, tpr_tau: float, fpr_tau: float) -> dict:
    return {
        "auroc": auroc,
        "auroc_low": low,
        "auroc_high": high,
        "fpr": 0.05,
        "fpr_low": 0.02,
        "fpr_high": 0.1,
        "n": n,
        "tpr": 0.5,
        "tpr_low": 0.4,
        "tpr_high": 0.6,
        "tpr_at_5pct_fpr": 0.444,
        "tpr_at_5pct_fpr_low": 0.222,
        "tpr_at_5pct_fpr_high": 0.666,
        "tpr_at_shipped_tau": tpr_tau,
        "tpr_at_shipped_tau_low": tpr_tau - 0.1 if tpr_tau == tpr_tau else NAN,
        "tpr_at_shipped_tau_high": tpr_tau + 0.1 if tpr_tau == tpr_tau else NAN,
        "fpr_at_shipped_tau": fpr_tau,
        "fpr_at_shipped_tau_low": fpr_tau / 2 if fpr_tau == fpr_tau else NAN,
        "fpr_at_shipped_tau_high": fpr_tau * 2 if fpr_tau == fpr_tau else NAN,
    }


def summary(mean: tuple[float, float, float], lowest: tuple[float, float, float], per_group: dict) -> dict:
    return {
        "max_fpr": 0.2,
        "mean_auroc": mean[0],
        "mean_auroc_low": mean[1],
        "mean_auroc_high": mean[2],
        "min_auroc": lowest[0],
        "min_auroc_low": lowest[1],
        "min_auroc_high": lowest[2],
        "per_group": per_group,
    }


def detector_metrics(auroc: float) -> dict:
    return {
        "accuracy": 0.8,
        "accuracy_low": 0.7,
        "accuracy_high": 0.9,
        "auroc": auroc,
        "auroc_low": auroc - 0.05,
        "auroc_high": auroc + 0.02,
        "fpr": 0.031,
        "fpr_low": 0.011,
        "fpr_high": 0.071,
        "n": 40,
        "tau": 0.97,
        "tpr": 0.7,
        "tpr_at_5pct_fpr": 0.65,
        "tpr_at_5pct_fpr_low": 0.55,
        "tpr_at_5pct_fpr_high": 0.75,
    }


def paired(difference: float, low: float, high: float, p: float) -> dict:
    return {"difference": difference, "low": low, "high": high, "p_value": p, "resamples": 200}


def write_run(root: Path, *, commits: tuple[str, ...] = ()) -> Path:
    """A run folder with the metrics files the page reads, in the shapes the stages write, small numbers."""
    commit = iter(commits or (COMMIT,) * 7)
    upstream = {
        "shipped_probe": summary(
            (0.812, 0.790, 0.830),
            (0.701, 0.650, 0.750),
            {
                "org/harmful-set": group(0.701, 0.65, 0.75, n=30, tpr_tau=0.375, fpr_tau=NAN),
                "org/mixed-set": group(0.923, 0.9, 0.95, n=20, tpr_tau=0.55, fpr_tau=0.125),
            },
        ),
        "lsi": summary(
            (0.799, 0.770, 0.820),
            (0.690, 0.640, 0.740),
            {
                "org/harmful-set": group(0.690, 0.64, 0.74, n=30, tpr_tau=NAN, fpr_tau=NAN),
                "org/mixed-set": group(0.908, 0.88, 0.93, n=20, tpr_tau=NAN, fpr_tau=NAN),
            },
        ),
    }
    presentation = {
        "shipped_probe": summary(
            (0.934, 0.91, 0.95),
            (0.861, 0.8, 0.9),
            {"typography": group(0.861, 0.8, 0.9, n=10, tpr_tau=0.5, fpr_tau=0.1)},
        ),
        "lsi": summary(
            (0.921, 0.9, 0.94),
            (0.852, 0.79, 0.89),
            {"typography": group(0.852, 0.79, 0.89, n=10, tpr_tau=0.5, fpr_tau=0.1)},
        ),
    }
    source = {
        "shipped_probe": summary(
            (0.902, 0.88, 0.92), (0.777, 0.7, 0.8), {"file-a": group(0.777, 0.7, 0.8, n=12, tpr_tau=0.5, fpr_tau=0.1)}
        ),
        "lsi": summary(
            (0.895, 0.87, 0.91),
            (0.765, 0.69, 0.79),
            {"file-a": group(0.765, 0.69, 0.79, n=12, tpr_tau=0.5, fpr_tau=0.1)},
        ),
    }
    metrics = {
        "cross_source": {},
        "detectors": {"lsi": detector_metrics(0.944), "shipped_probe": detector_metrics(0.951)},
        "fusion_layer": 6,
        "held_out": {"presentation": presentation, "source": source, "upstream": upstream},
        "held_out_by": "upstream",
        "held_out_summary": upstream,
        "intervals": {"bootstrap_resamples": 200, "confidence": 0.95},
        "paired": {
            "confidence": 0.95,
            "held_out": {"org/mixed-set": {"lsi": paired(0.015, -0.01, 0.04, 0.25)}},
            "held_out_mean": {"lsi": paired(-0.021, -0.040, -0.003, 0.010)},
            "in_source": {"lsi": paired(0.007, -0.002, 0.016, 0.333)},
            "metric": "auroc",
            "reference": "shipped_probe",
            "resamples": 200,
        },
        "per_source": {},
        "run": run_record(next(commit), 30.0),
        "safety_layer": 3,
        "shipped": {
            "describe": "shipped_probe on benign@3, delta@6 (last pooling)",
            "detector": "shipped_probe",
            "held_out_auroc": 0.8765,
        },
        "shipped_per_category": {},
        "shipped_scaling": "none",
        "shipped_test_ece": 0.05,
        "target_fpr": 0.05,
    }
    sweep = {
        "best": {"fusion_layer": 6, "held_out_auroc": 0.8642, "safety_layer": 3, "val_auroc": 0.95},
        "detectors": [
            {"held_out_auroc": 0.8642, "name": "lsi", "per_group": {"org/mixed-set": 0.9}},
            {"held_out_auroc": 0.8765, "name": "shipped_probe", "per_group": {"org/mixed-set": 0.91}},
        ],
        "held_out_by": "upstream",
        "layers": [3, 6],
        "pairs": [{"fusion_layer": 6, "held_out_auroc": 0.8642, "safety_layer": 3, "val_auroc": 0.95}],
        "run": run_record(next(commit), 60.0),
        "select_by": "held_out",
    }
    calibration = {
        "calib_f1": 0.5,
        "calib_fpr": 0.045,
        "calib_tpr": 0.333,
        "detector": "shipped_probe on benign@3, delta@6 (last pooling)",
        "ece_raw": 0.2,
        "ece_scaled": 0.2,
        "method": "target_fpr",
        "n_benign": 22,
        "n_harmful": 21,
        "run": run_record(next(commit), 2.0),
        "scaling": {"intercept": 0.0, "kind": "none", "slope": 1.0},
        "target_fpr": 0.05,
        "tau": 0.98766,
    }
    rates = {
        "accuracy": 0.7,
        "accuracy_low": 0.48,
        "accuracy_high": 0.855,
        "benign_answered": 0.9,
        "benign_answered_low": 0.6,
        "benign_answered_high": 0.98,
        "harmful_refused": 0.5,
        "harmful_refused_low": 0.24,
        "harmful_refused_high": 0.76,
        "n": 20,
        "n_benign": 10,
        "n_harmful": 10,
    }
    sanity = {
        **rates,
        "ecso_routed": 0,
        "errors": [],
        "n_errors": 0,
        "per_input": {"text": dict(rates)},
        "run": run_record(next(commit), 3.0),
    }
    guard = {
        "check_errors": 0,
        "ecso_rate_benign": 0.0,
        "ecso_rate_benign_low": 0.0,
        "ecso_rate_benign_high": 0.5,
        "ecso_rate_harmful": 0.0,
        "ecso_rate_harmful_low": 0.0,
        "ecso_rate_harmful_high": 0.5,
        "mean_seconds": 1.25,
        "n": 4,
        "n_benign": 2,
        "n_harmful": 2,
        "policy": "lsi",
        "refusal_rate_benign": 0.0,
        "refusal_rate_benign_low": 0.0,
        "refusal_rate_benign_high": 0.66,
        "refusal_rate_harmful": 0.5,
        "refusal_rate_harmful_low": 0.09,
        "refusal_rate_harmful_high": 0.91,
        "run": run_record(next(commit), 4.0),
    }
    defence = {
        "added_seconds": -0.25,
        "asr_basis": "not_refused",
        "attack_success_rate": 0.25,
        "attack_success_rate_low": 0.05,
        "attack_success_rate_high": 0.7,
        "benign_answer_rate": 1.0,
        "benign_answer_rate_low": 0.51,
        "benign_answer_rate_high": 1.0,
        "ecso_rate": 0.0,
        "ecso_rate_low": 0.0,
        "ecso_rate_high": 0.49,
        "harmful_refusal_rate": 0.75,
        "harmful_refusal_rate_low": 0.3,
        "harmful_refusal_rate_high": 0.954,
        "judge_mean_score": None,
        "mean_seconds": 0.5,
        "n_benign": 4,
        "n_errors": 0,
        "n_harmful": 4,
    }
    compare = {
        "benchmarks": {"demo": {"lsi": defence, "none": {**defence, "harmful_refusal_rate": 0.125}}},
        "confidence": 0.95,
        "defences": ["none", "lsi"],
        "detector": "shipped_probe on benign@3, delta@6 (last pooling)",
        "judge": "refusal_phrases",
        "model": "TinyModel+OCR",
        "n_examples": {"demo": 8},
        "run": run_record(next(commit), 5.0),
        "suite": "demo",
        "tau": 0.98766,
    }
    files = {
        "data/eval/metrics.json": metrics,
        "data/sweep/sweep.json": sweep,
        "data/calibration/metrics.json": calibration,
        "data/sanity/metrics.json": sanity,
        "data/guard/summary.json": guard,
        "data/compare/demo/metrics.json": compare,
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data), encoding="utf-8")  # NaN as the stages write it
    (root / "data/eval/comparison.md").write_text(
        "## Held out by upstream (the headline: train.held_out_by)\n\n| detector | mean AUROC |\n|---|---|\n"
        "| lsi | 0.799 [0.770, 0.820] |\n",
        encoding="utf-8",
    )
    return root


def run_script(run: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--run", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_page_names_the_commit_and_shows_the_numbers(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    out = tmp_path / "docs" / "results.md"
    result = run_script(run, out)
    assert result.returncode == 0, result.stderr
    page = out.read_text(encoding="utf-8")
    # which run it shows
    assert f"commit `{COMMIT}`" in page
    assert "no tracked file differed from it" in page
    assert "`TinyModel+OCR`" in page and "`feedface`" in page
    # the headline held out by upstream: mean and lowest with intervals, per upstream
    assert "| **`shipped_probe` (shipped)** | 0.812 [0.790, 0.830] | 0.701 [0.650, 0.750] | 0.701 | 0.923 |" in page
    assert "| `lsi` | 0.799 [0.770, 0.820] | 0.690 [0.640, 0.740] | 0.690 | 0.908 |" in page
    # the operating point: TPR at 5% FPR, harmful and benign flagged at the shipped tau ("-" where undefined)
    assert "| `org/harmful-set` | 30 | 0.44 [0.22, 0.67] | 0.38 [0.28, 0.47] | - |" in page
    assert "| `org/mixed-set` | 20 | 0.44 [0.22, 0.67] | 0.55 [0.45, 0.65] | 0.12 [0.06, 0.25] |" in page
    # held out by presentation and by source
    assert "0.934 [0.910, 0.950]" in page and "0.902 [0.880, 0.920]" in page
    # paired tests
    assert "| `lsi` | +0.007 [-0.002, +0.016], p 0.333 | -0.021 [-0.040, -0.003], p 0.010 |" in page
    # the chosen layers, detector and tau
    assert "| fusion / safety layer | 6 / 3 |" in page
    assert "`shipped_probe on benign@3, delta@6 (last pooling)`" in page
    assert "| tau | 0.9877 |" in page
    # the everyday set
    assert "| all | 20 | 0.700 [0.480, 0.855] | 5 of 10 (0.50 [0.24, 0.76]) | 9 of 10 (0.90 [0.60, 0.98]) |" in page
    # the defence comparison, in the file's defence order
    assert page.index("| `demo` | `none` |") < page.index("| `demo` | `lsi` |")
    assert "75.0% [30.0%, 95.4%]" in page
    # the evaluate stage's own tables, nested under the page's headings
    assert "### Held out by upstream (the headline: train.held_out_by)" in page
    assert "[Findings](findings.md)" in page


def test_different_commits_are_listed_per_file(tmp_path: Path) -> None:
    commits = (COMMIT, "f" * 40, COMMIT, COMMIT, COMMIT, COMMIT)
    run = write_run(tmp_path / "run", commits=commits)
    out = tmp_path / "results.md"
    assert run_script(run, out).returncode == 0
    page = out.read_text(encoding="utf-8")
    assert "come from different commits" in page
    assert "| `data/sweep/sweep.json` | `ffffffffffff` |" in page


@pytest.mark.parametrize("missing", REQUIRED)
def test_a_missing_metrics_file_is_named(tmp_path: Path, missing: str) -> None:
    run = write_run(tmp_path / "run")
    (run / missing).unlink()
    out = tmp_path / "results.md"
    result = run_script(run, out)
    assert result.returncode == 2
    assert missing in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_the_comparison_is_optional(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    (run / "data/compare/demo/metrics.json").unlink()
    out = tmp_path / "results.md"
    assert run_script(run, out).returncode == 0
    assert "## The defence comparison" not in out.read_text(encoding="utf-8")
