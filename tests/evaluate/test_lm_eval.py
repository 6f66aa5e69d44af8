"""A comparison summary in lm-evaluation-harness's results layout."""

from __future__ import annotations

import math

import pytest

from pipeline import __version__
from pipeline.evaluate.lm_eval import lm_eval_results, rate_stderr

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
    assert lsi["harmful_refusal_rate"] == 0.75
    assert lsi["harmful_refusal_rate_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 8))
    assert lsi["harmless_rate_stderr"] == 0.0
    # No benign example: no rate, no stderr, rather than a made-up zero.
    assert "benign_answer_rate" not in lsi and "benign_answer_rate_stderr" not in lsi
    assert document["versions"] == {"mmsb_lsi": __version__, "mmsb_none": __version__}
    assert document["n-samples"]["mmsb_none"] == {"original": 8, "effective": 8}
    assert lsi["attack_success_rate_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 8))
    assert document["higher_is_better"]["mmsb_lsi"] == {
        "harmful_refusal_rate": True,
        "harmless_rate": True,
        "attack_success_rate": False,
    }
    assert document["config"]["model_args"] == "model=tiny,detector=lsi@3/1,tau=0.4"
    assert document["config"]["limit"] == 8 and document["config"]["run"] == run
    assert (document["git_hash"], document["date"]) == ("abc", 1.5)
