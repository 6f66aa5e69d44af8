"""The whole DVC pipeline in a temporary git+DVC repository, on a tiny random LLaVA and tiny data.

Also checks what users rely on: a code change reruns the stages that import it, a probe-parameter
change (``dvc exp run -S`` or an edit) reruns no extraction, and a second clone that pulls the
activation store from a shared remote reruns the probe stages, with or without ../shared beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.imports import stage_code
from tests.paths import PROJECT_ROOT, SHARED_BENCHMARKS

pytestmark = pytest.mark.integration


def run(cmd: list[str], cwd: Path) -> str:
    """Run a command with this interpreter's environment first on PATH; fail with its output."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(cwd)  # the repository's own copy of the code, not the editable install
    env["DVC_NO_ANALYTICS"] = "1"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed in {cwd}:\n{output[-4000:]}"
    return output


def stages_run(output: str) -> set[str]:
    """Names of the stages ``dvc repro`` ran (not those it skipped)."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def tiny_requests(path: Path, per_group: int = 3) -> None:
    """A small, still varied slice of a demo source (same file name): a few rows per label and category."""
    seen: dict[tuple[str, str], int] = {}
    keep = []
    for line in (PROJECT_ROOT / "data" / "demo" / path.name).read_text().splitlines():
        row = json.loads(line)
        key = (row["label"], row["category"])
        if seen.get(key, 0) < per_group:
            seen[key] = seen.get(key, 0) + 1
            keep.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(keep) + "\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_llava_folder: Path) -> Path:
    """A fresh repository with the project's code, dvc.yaml and tiny params, after one full ``dvc repro``."""
    root = tmp_path_factory.mktemp("study")
    for name in ("pipeline", "stages"):
        shutil.copytree(PROJECT_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "dvc.lock"))
    # dev/ is a DVC project of its own: its config and dvc.yaml, not its lock, cache or temporary files.
    for name in ("dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        (root / "dev" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / "dev" / name, root / "dev" / name)
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / ".gitignore").write_text((PROJECT_ROOT / ".gitignore").read_text())
    tiny_requests(root / "data" / "demo" / "requests.jsonl")
    tiny_requests(root / "data" / "demo" / "lookalike.jsonl", per_group=2)
    # The sanity set is no prepare source; the sanity stage scores all of it with the run's guard.
    shutil.copy(PROJECT_ROOT / "data" / "demo" / "everyday.jsonl", root / "data" / "demo" / "everyday.jsonl")
    shutil.copytree(PROJECT_ROOT / "data" / "public", root / "data" / "public")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["model"].update(kind="hf", path=str(tiny_llava_folder))
    params["extract"].update(layers=[0, 1, 2, 3], batch_size=8)
    params["build"].update(per_source=4)
    params["train"].update(fusion_layer=3, safety_layer=1, epochs=3)
    params["guard"].update(sample_size=4, max_new_tokens=4)
    params["ecso"].update(sample_size=2, max_new_tokens=4)
    params["attribute"].update(examples=2, steps=4)
    params["ecso"].update(caption_max_new_tokens=4)
    params["compare"].update(max_new_tokens=4)
    params["compare"]["suites"]["demo"][0]["limit"] = 6
    for benchmark in params["compare"]["suites"]["dev"]:
        benchmark["limit"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run(["dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "study"], root)
    output = run(["dvc", "repro"], root)
    expected = {"build", "prepare", "extract", "sweep", "train", "calibrate", "evaluate", "guard", "ecso", "attribute"}
    expected |= {"compare", "report", "sanity"}
    assert expected <= stages_run(output)
    assert "tau from held-out-upstream" in output  # calibrate.held_out is on by default
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "results"], root)
    return root


def test_full_pipeline_writes_every_output(repo: Path) -> None:
    metrics = json.loads((repo / "data/eval/metrics.json").read_text())
    detectors = set(metrics["detectors"])
    baselines = {
        "logreg_hs_delta",
        "logreg_hs",
        "logreg_delta",
        "logreg_plain",
        "logreg_plain_all",
        "refusal_direction",
    }
    assert {"lsi", "length_only", "style_only"} | baselines == detectors
    assert metrics["detectors"]["logreg_plain"]["layer"] in (0, 1, 2, 3)
    assert 0.0 <= metrics["detectors"]["lsi"]["auroc"] <= 1.0
    assert sorted(p.name for p in (repo / "data/eval/roc").iterdir()) == sorted(f"{name}.csv" for name in detectors)
    # Held out: each source, every detector, next to its in-source number on the same rows.
    public = {"public-imperative", "public-questions", "public-wrapped", "public-typo"}
    # per_source 4 leaves some built sources without test rows of both labels to score: those are skipped.
    assert {"requests", "lookalike"} <= set(metrics["cross_source"]) <= {"requests", "lookalike"} | public
    for source, rows in metrics["cross_source"].items():
        assert set(rows) == detectors
        assert all(rows[name]["n"] == metrics["per_source"][source][name]["n"] for name in detectors)
    comparison = (repo / "data/eval/comparison.md").read_text()
    assert "| lookalike | lsi |" in comparison and "paired bootstrap interval" in comparison
    lsi = metrics["detectors"]["lsi"]
    assert lsi["auroc_low"] <= lsi["auroc"] <= lsi["auroc_high"] and lsi["fpr_low"] <= lsi["fpr"] <= lsi["fpr_high"]
    # The primary held-out table leaves out whole upstreams; the paired test runs on its rows.
    assert metrics["held_out_by"] == "upstream" and {"upstream", "presentation", "source"} == set(metrics["held_out"])
    upstreams = set(metrics["held_out_summary"]["lsi"]["per_group"])
    assert {"requests", "lookalike"} <= upstreams and len(upstreams) >= 4
    assert set(metrics["paired"]["held_out"]) == upstreams
    # The paired test sets the shipped detector (guard.detector: best, whichever won) against every other.
    assert set(metrics["paired"]["held_out_mean"]) == detectors - {metrics["shipped"]["detector"]}
    sweep = json.loads((repo / "data/sweep/sweep.json").read_text())
    assert len(sweep["pairs"]) == 16 and (repo / "data/sweep/held_out_auroc.png").stat().st_size > 0
    assert "ece_raw" in json.loads((repo / "data/calibration/calibration.json").read_text())
    for png in ("data/eval/roc.png", "data/eval/reliability.png", "data/calibration/reliability.png"):
        assert (repo / png).stat().st_size > 0
    assert (repo / "data/probe/probe.safetensors").is_file()
    # guard.detector: best ships the detector the sweep found to transfer best, and says which.
    scores = {row["name"]: row["held_out_auroc"] for row in sweep["detectors"]}
    shipped = json.loads((repo / "data/probe/probe.json").read_text())
    assert shipped["detector"] == metrics["shipped"]["detector"]
    assert shipped["held_out_auroc"] == pytest.approx(max(scores.values()))
    assert "tau" in json.loads((repo / "data/calibration/calibration.json").read_text())
    guard_rows = (repo / "data/guard/responses.jsonl").read_text().splitlines()
    assert len(guard_rows) == 4 and all("refused" in json.loads(r) for r in guard_rows)
    assert len((repo / "data/ecso/records.jsonl").read_text().splitlines()) == 2
    assert list((repo / "data/attribution").glob("*_tokens.png"))
    sanity = json.loads((repo / "data/sanity/metrics.json").read_text())
    assert (sanity["n"], sanity["n_harmful"], sanity["n_benign"], sanity["n_errors"]) == (60, 30, 30, 0)
    assert sanity["per_input"]["image"]["n"] == 12
    assert len((repo / "data/sanity/rows.jsonl").read_text().splitlines()) == 60
    assert "Data and pipelines are up to date" in run(["dvc", "status", "dvc.yaml"], repo)


def test_comparison_and_report_on_the_demo_data(repo: Path) -> None:
    metrics = json.loads((repo / "data/compare/demo/metrics.json").read_text())
    assert metrics["defences"] == ["none", "lsi", "ecso", "lsi_then_ecso"] and metrics["n_examples"] == {"demo": 6}
    per_defence = metrics["benchmarks"]["demo"]
    assert set(per_defence) == set(metrics["defences"])
    for values in per_defence.values():
        assert values["n_harmful"] + values["n_benign"] + values["n_errors"] == 6
        assert values["harmful_refusal_rate"] is not None and values["benign_answer_rate"] is not None
    rows = (repo / "data/compare/demo/rows.jsonl").read_text().splitlines()
    assert len(rows) == 6 * 4
    assert all(json.loads(r)["ecso"] is not None for r in rows if json.loads(r)["defence"] == "ecso")
    shown = run(["dvc", "metrics", "show", "data/compare/demo/metrics.json"], repo)
    assert "benchmarks.demo.lsi.harmful_refusal_rate" in shown
    assert "benchmarks.demo.lsi.harmful_refusal_rate_low" in shown
    page = (repo / "data/report/demo/report.html").read_text()
    for text in ("Defence comparison: demo", "Held-out sources", "LSI (the method)", "Layer sweep", "Examples: demo"):
        assert text in page, text
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch


@pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason=f"shared benchmark data not found at {SHARED_BENCHMARKS}")
def test_dev_configuration_compares_on_the_shared_benchmarks(repo: Path) -> None:
    """``dvc --cd dev repro`` runs the comparison on ../shared/benchmarks on the main run's probe and tau."""
    shared = repo.parent / "shared"
    if not shared.exists():
        shared.symlink_to(SHARED_BENCHMARKS.parent, target_is_directory=True)
    output = run(["dvc", "--cd", "dev", "repro"], repo)
    assert stages_run(output) == {"compare_dev", "report_dev"}
    metrics = json.loads((repo / "data/compare/dev/metrics.json").read_text())
    assert metrics["n_examples"] == {"mmsb-typo": 4, "mmsb-text": 4, "mm-vet": 4, "alpaca-seed": 4}
    assert metrics["benchmarks"]["mmsb-typo"]["lsi"]["n_harmful"] == 4
    assert metrics["benchmarks"]["mm-vet"]["none"]["n_benign"] == 4
    summary = json.loads((repo / "data/compare/dev/summary.json").read_text())
    assert len(summary["benchmarks"]["mmsb-typo"]["lsi"]["per_category"]) == 4  # scenarios, one each
    page = (repo / "data/report/dev/report.html").read_text()
    assert "Defence comparison: demo" in page and "Defence comparison: dev" in page
    assert "mmsb-typo" in page
    assert stages_run(run(["dvc", "--cd", "dev", "repro"], repo)) == set()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo)  # the main project's, as before


def test_cli_guards_requests_with_the_runs_outputs(repo: Path) -> None:
    """``lsi-guard`` on the finished run gives the guard stage's scores for the same requests."""
    stage_rows = [json.loads(line) for line in (repo / "data/guard/responses.jsonl").read_text().splitlines()]
    requests = repo / "requests.jsonl"
    requests.write_text(
        "".join(json.dumps({"id": r["row_id"], "text": r["text"], "image": r["image_path"]}) + "\n" for r in stage_rows)
    )
    results = repo / "cli_results.jsonl"
    command = [sys.executable, "-m", "lsi_guard_app.cli", "generate", "--run", str(repo), "--input", str(requests)]
    run([*command, "--output", str(results), "--max-new-tokens", "4"], repo)
    cli_rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["id"] for r in cli_rows] == [r["row_id"] for r in stage_rows]
    for stage_row, cli_row in zip(stage_rows, cli_rows, strict=True):
        assert cli_row["score"] == pytest.approx(stage_row["score"], abs=1e-5)
        assert cli_row["action"] == stage_row["action"] and cli_row["response"] == stage_row["response"]


def changed_stages(repo: Path) -> set[str]:
    """Stage names ``dvc status`` reports as changed in the main project."""
    report = json.loads(run(["dvc", "status", "--json"], repo).strip().splitlines()[-1])
    return {name.rpartition(":")[2] for name in report}


def test_library_change_marks_exactly_the_stages_that_import_it(repo: Path) -> None:
    """Editing pipeline/detect changes the stages whose code imports it, as dvc.yaml's deps say, and no other."""
    code = stage_code(repo, repo / "dvc.yaml")
    expected = {name for name, (files, _) in code.items() if any(f.parts[:2] == ("pipeline", "detect") for f in files)}
    assert "extract" in expected  # the edit matters; stages that import no detection code must stay unchanged
    edited = repo / "pipeline" / "detect" / "probe.py"
    original = edited.read_text()
    edited.write_text(original + "# an edit\n")
    try:
        assert changed_stages(repo) == expected
    finally:
        edited.write_text(original)
    assert changed_stages(repo) == set()


def test_experiment_with_a_new_learning_rate_reruns_only_the_probe_stages(repo: Path) -> None:
    """``dvc exp run -S train.lr=1e-3`` reaches the optimiser's config and leaves extraction alone."""
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] != 0.001
    ran = stages_run(run(["dvc", "exp", "run", "-S", "train.lr=1e-3"], repo))
    assert {"sweep", "train", "calibrate", "evaluate"} <= ran
    assert not ran & {"convert_model", "build", "prepare", "extract", "ecso"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 0.001
    trained = json.loads((repo / "data/probe/train_metrics.json").read_text())
    assert trained["options"]["lr"] == 0.001
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "lr experiment"], repo)


def test_probe_parameter_change_skips_extraction(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 0.002
    params["calibrate"]["held_out"] = False  # the default run chose tau on held-out scores; now in-source
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = run(["dvc", "repro"], repo)
    ran = stages_run(output)
    assert "train" in ran and "calibrate" in ran and "evaluate" in ran
    assert "tau from held-out-upstream" not in output
    assert not ran & {"convert_model", "build", "prepare", "extract", "ecso"}
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "lr"], repo)


def test_layer_change_or_best_layers_skip_extraction_and_the_sweep(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(fusion_layer="best", safety_layer="best")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = stages_run(run(["dvc", "repro"], repo))
    assert {"train", "calibrate", "evaluate"} <= ran
    assert not ran & {"prepare", "extract", "sweep"}
    best = json.loads((repo / "data/sweep/sweep.json").read_text())["best"]
    trained = json.loads((repo / "data/probe/train_metrics.json").read_text())
    assert (trained["fusion_layer"], trained["safety_layer"]) == (best["fusion_layer"], best["safety_layer"])
    params["train"].update(fusion_layer=2, safety_layer=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = stages_run(run(["dvc", "repro"], repo))
    assert "train" in ran and not ran & {"prepare", "extract", "sweep"}
    assert json.loads((repo / "data/probe/train_metrics.json").read_text())["fusion_layer"] == 2
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "layers"], repo)


def test_second_clone_pulls_the_store_and_reruns_probe_stages(repo: Path, tmp_path: Path) -> None:
    """The sharing commands of docs/sharing.md, verbatim; they must work whether or not ../shared exists."""
    remote = tmp_path / "team-remote"
    run(["dvc", "remote", "add", "-d", "team", str(remote)], repo)
    run(["git", "add", ".dvc/config"], repo)
    run(["git", "commit", "-q", "-m", "Add team DVC remote"], repo)
    run(["dvc", "push"], repo)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert (clone / "data/activations/store.zarr/zarr.json").is_file()
    # Metrics and plots are cached too, so the clone holds the whole run: nothing to recompute.
    assert json.loads(run(["dvc", "status", "--json"], clone)) == {}
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = stages_run(run(["dvc", "repro", "evaluate"], clone))
    assert ran == {"sweep", "train", "calibrate", "evaluate"}
    assert json.loads((clone / "data/probe/train_metrics.json").read_text())["best_epoch"] <= 1
