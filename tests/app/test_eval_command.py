"""``lsi-guard eval``: a comparison suite outside DVC, its files, its lm-evaluation-harness JSON, its refusals."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from lsi_guard_app.cli import main
from tests.defend.test_guard import write_run
from tests.evaluate.test_comparison import ClockedAdapter
from tests.stages.test_compare_stage import REQUESTS, write_params


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished run (fake model, hand-set probe, five-request benchmark); the caller's folder is elsewhere."""
    folder = tmp_path / "run"
    write_run(folder)
    write_params(folder)
    (folder / "bench").mkdir()
    (folder / "bench/mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    monkeypatch.setattr("pipeline.defend.loading.load_adapter", lambda config, *_: ClockedAdapter())
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    return folder


def test_eval_writes_the_compare_files_and_the_lm_eval_json(run: Path) -> None:
    stdout = io.StringIO()
    status = main(
        ["eval", "--suite", "s", "--run", str(run), "--limit", "4", "--output", "out", "--lm-eval-json", "lm.json"],
        stdout=stdout,
    )
    assert status == 0
    assert "| mine | lsi |" in stdout.getvalue()
    out = Path("out")  # relative to the caller's folder, not the run's
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "metrics.json", "rows.jsonl", "summary.json"]
    assert not (run / "data/compare").exists() and not Path("out.partial.jsonl").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_examples"] == {"mine": 4}
    record = json.loads((out / "metrics.json").read_text())["run"]
    assert record["model_name"] == ClockedAdapter().info.name and record["device"] == "cpu"
    assert record["wall_time_s"] >= 0 and "torch" in record["libraries"]

    document = json.loads(Path("lm.json").read_text())
    assert set(document) >= {"results", "versions", "n-samples", "higher_is_better", "config"}
    lsi = summary["benchmarks"]["mine"]["lsi"]
    task = document["results"]["mine_lsi"]
    p, n = lsi["harmful_refusal_rate"], lsi["n_harmful"]
    assert task["harmful_refusal_rate,none"] == p
    assert task["harmful_refusal_rate_stderr,none"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    assert task["benign_answer_rate_stderr,none"] == pytest.approx(
        math.sqrt(lsi["benign_answer_rate"] * (1 - lsi["benign_answer_rate"]) / lsi["n_benign"])
    )
    assert set(document["results"]) == {f"mine_{d}" for d in ("none", "lsi", "ecso", "lsi_then_ecso")}
    assert document["n-samples"]["mine_none"] == {"original": 4, "effective": 4}
    assert document["config"]["limit"] == 4 and document["config"]["suite"] == "s"
    assert document["git_hash"] == record["git_commit"]


def test_eval_refuses_what_it_cannot_run_before_any_work(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--suite", "nope", "--run", str(run), "--output", "out"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["eval", "--suite", "s", "--run", "elsewhere"]) == 2
    assert "--run elsewhere: no params.yaml there" in capsys.readouterr().err
    Path("file").write_text("x")
    assert main(["eval", "--suite", "s", "--run", str(run), "--output", "file"]) == 2
    assert "--output file: is a file" in capsys.readouterr().err
    assert not Path("out").exists() and not (run / "data/compare").exists()
    with pytest.raises(SystemExit):
        main(["eval", "--suite", "s", "--limit", "0"])
    assert "must be at least 1" in capsys.readouterr().err
