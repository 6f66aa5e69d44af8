"""A comparison's results in lm-evaluation-harness's results layout, for dashboards that read it.

lm-evaluation-harness writes one JSON document per run: ``results`` maps a task to its metrics,
each beside its standard error under its filter (``<metric>,none`` and ``<metric>_stderr,none``, as
lm-evaluation-harness 0.4 writes them; no filter is applied here), with ``versions``,
``n-samples``, ``higher_is_better`` and the run's ``config``. Here a task is one benchmark under
one defence (``<benchmark>_<defence>``), and its metrics are the comparison's rates (refusal,
harmlessness, benign answers, attack success); the
standard error of a rate ``p`` over ``n`` examples is ``sqrt(p (1 - p) / n)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline.version import __version__

# Each reported rate, the summary count it is a share of, and whether higher is better.
RATES: tuple[tuple[str, str, bool], ...] = (
    ("harmful_refusal_rate", "n_harmful", True),
    ("harmless_rate", "n_harmful", True),
    ("benign_answer_rate", "n_benign", True),
    ("attack_success_rate", "n_harmful", False),  # see the summary's asr_basis for what it counts
)

# lm-evaluation-harness 0.4 keys each metric by "<metric>,<filter>"; these rates pass through no filter.
FILTER = "none"


def metric_key(metric: str, stderr: bool = False) -> str:
    """The results key of ``metric`` (or of its standard error) in lm-evaluation-harness 0.4's layout."""
    return f"{metric}_stderr,{FILTER}" if stderr else f"{metric},{FILTER}"


def rate_stderr(rate: float, n: int) -> float:
    """The standard error of a share ``rate`` of ``n`` examples: ``sqrt(p (1 - p) / n)``."""
    if n <= 0:
        raise ValueError(f"a rate needs at least one example, got n={n}")
    return math.sqrt(rate * (1.0 - rate) / n)


def task_name(benchmark: str, defence: str) -> str:
    """The task a benchmark under one defence is reported as."""
    return f"{benchmark}_{defence}"


def lm_eval_results(
    suite: str,
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]],
    meta: Mapping[str, Any],
    limit: int | None = None,
    date: float | None = None,
) -> dict[str, Any]:
    """The lm-evaluation-harness document of a comparison ``summary`` (``{benchmark: {defence: metrics}}``).

    ``meta`` is the rest of the compare stage's ``summary.json`` (model, judge, tau, detector, run
    record). A rate that is None (no example of its label) is left out with its standard error.
    """
    results: dict[str, dict[str, Any]] = {}
    n_samples: dict[str, dict[str, int]] = {}
    higher: dict[str, dict[str, bool]] = {}
    for benchmark, defences in summary.items():
        for defence, metrics in defences.items():
            task = task_name(benchmark, defence)
            entry: dict[str, Any] = {"alias": f"{benchmark} ({defence})"}
            for rate, count, better in RATES:
                value, n = metrics.get(rate), int(metrics.get(count) or 0)
                if value is None or n == 0:
                    continue
                entry[metric_key(rate)] = value
                entry[metric_key(rate, stderr=True)] = rate_stderr(float(value), n)
                higher.setdefault(task, {})[rate] = better
            results[task] = entry
            examples = int(metrics.get("n_harmful") or 0) + int(metrics.get("n_benign") or 0)
            n_samples[task] = {"original": examples, "effective": examples}
    run = meta.get("run") or {}
    return {
        "results": results,
        "versions": {task: __version__ for task in results},
        "n-samples": n_samples,
        "higher_is_better": higher,
        "config": {
            "model": "lsi-guard",
            "model_args": f"model={meta.get('model')},detector={meta.get('detector')},tau={meta.get('tau')}",
            "suite": suite,
            "judge": meta.get("judge"),
            "defences": list(meta.get("defences") or []),
            "limit": limit,
            "device": run.get("device"),
            "run": dict(run),
        },
        "git_hash": run.get("git_commit"),
        "date": date,
    }
