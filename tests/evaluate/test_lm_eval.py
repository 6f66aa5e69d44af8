"""A comparison summary in lm-evaluation-harness's results layout."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from pipeline import __version__
from pipeline.evaluate.lm_eval import lm_eval_results, metric_key, rate_stderr

DATA = Path(__file__).parent / "data"

SUMMARY = {
    "mmsb": {
        "lsi": {
            "harmful_refusal_rate": 0.75,
            "harmless_rate": 1.0,
            "benign_answer_rate": None,
            "attack_success_rate": 0.25,
            "n_harmful": 8,
            "n_benign": 0,
        },
        "none": {
            "harmful_refusal_rate": 0.0,
            "harmless_rate": 0.25,
            "benign_answer_rate": None,
            "n_harmful": 8,
            "n_benign": 0,
        },
    }
}
META = {"model": "tiny", "detector": "lsi@3/1", "tau": 0.4, "judge": "refusal_phrases", "defences": ["none", "lsi"]}


def test_rate_stderr_is_the_binomial_standard_error() -> None:
    assert rate_stderr(0.5, 100) == pytest.approx(0.05)
    assert rate_stderr(0.0, 10) == 0.0 and rate_stderr(1.0, 10) == 0.0
    with pytest.raises(ValueError, match="n=0"):
        rate_stderr(0.5, 0)


def test_each_benchmark_and_defence_is_a_task_with_its_rates_and_their_stderr() -> None:
    run = {"git_commit": "abc", "device": "cpu"}
    document = lm_eval_results("dev", SUMMARY, {**META, "run": run}, limit=8, date=1.5)
    lsi = document["results"]["mmsb_lsi"]
    assert lsi["alias"] == "mmsb (lsi)"
    assert lsi["harmful_refusal_rate,none"] == 0.75
    assert lsi["harmful_refusal_rate_stderr,none"] == pytest.approx(math.sqrt(0.75 * 0.25 / 8))
    assert lsi["harmless_rate_stderr,none"] == 0.0
    # No benign example: no rate, no stderr, rather than a made-up zero.
    assert not any(key.startswith("benign_answer_rate") for key in lsi)
    assert document["versions"] == {"mmsb_lsi": __version__, "mmsb_none": __version__}
    assert document["n-samples"]["mmsb_none"] == {"original": 8, "effective": 8}
    assert lsi["attack_success_rate_stderr,none"] == pytest.approx(math.sqrt(0.25 * 0.75 / 8))
    assert document["higher_is_better"]["mmsb_lsi"] == {
        "harmful_refusal_rate": True,
        "harmless_rate": True,
        "attack_success_rate": False,
    }
    assert document["config"]["model_args"] == "model=tiny,detector=lsi@3/1,tau=0.4"
    assert document["config"]["limit"] == 8 and document["config"]["run"] == run
    assert (document["git_hash"], document["date"]) == ("abc", 1.5)


def read_like_lm_eval(document: dict[str, Any]) -> dict[str, dict[str, tuple[float, float | None]]]:
    """Each task's metrics as lm-evaluation-harness 0.4's table writer reads them.

    It splits every results key at the comma into metric and filter, skips the alias and the
    ``_stderr`` keys, and looks the standard error up as ``<metric>_stderr,<filter>``.
    """
    table: dict[str, dict[str, tuple[float, float | None]]] = {}
    for task, entry in document["results"].items():
        for key, value in entry.items():
            if key == "alias":
                continue
            metric, _, filter_name = key.partition(",")
            assert filter_name, f"{task}: key {key!r} has no ',<filter>' part"
            if metric.endswith("_stderr"):
                continue
            stderr = entry.get(f"{metric}_stderr,{filter_name}")
            table.setdefault(task, {})[metric] = (value, stderr)
        assert set(document["higher_is_better"][task]) == set(table[task]), task
    return table


def test_the_reference_layout_reads_as_lm_eval_reads_it() -> None:
    reference = json.loads((DATA / "lm_eval_0_4_results.json").read_text())
    assert read_like_lm_eval(reference) == {"arc_easy": {"acc": (0.66, 0.015), "acc_norm": (0.637, 0.0152)}}


def test_our_document_reads_as_lm_eval_reads_it_and_carries_its_top_level_keys() -> None:
    reference = json.loads((DATA / "lm_eval_0_4_results.json").read_text())
    document = lm_eval_results("dev", SUMMARY, {**META, "run": {}}, limit=8, date=1.5)
    table = read_like_lm_eval(document)
    assert table["mmsb_lsi"]["harmful_refusal_rate"] == (0.75, pytest.approx(math.sqrt(0.75 * 0.25 / 8)))
    assert table["mmsb_none"]["harmless_rate"] == (0.25, pytest.approx(math.sqrt(0.25 * 0.75 / 8)))
    shared = {"results", "versions", "n-samples", "higher_is_better", "config", "git_hash", "date"}
    assert shared <= set(reference) and shared <= set(document)
    assert metric_key("harmless_rate") == "harmless_rate,none"
    assert metric_key("harmless_rate", stderr=True) == "harmless_rate_stderr,none"
