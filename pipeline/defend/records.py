"""Output lines and summaries of the ``guard`` and ``ecso`` stages: one line per request, rates per label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from pipeline.data.rows import BENIGN, HARMFUL, rate, row_fields
from pipeline.defend.decisions import GuardedResponse, response_record
from pipeline.defend.ecso import ECSORecord

# Each summary's rates and the count each is a share of: the stages add their intervals beside them.
ECSO_RATES: dict[str, str] = {
    "judged_harmful_rate_harmful": "n_harmful",
    "judged_harmful_rate_benign": "n_benign",
    "changed_rate": "n",
}
GUARD_RATES: dict[str, str] = {
    "refusal_rate_harmful": "n_harmful",
    "refusal_rate_benign": "n_benign",
    "ecso_rate_harmful": "n_harmful",
    "ecso_rate_benign": "n_benign",
}


def ecso_record(row: Mapping[str, Any], record: ECSORecord) -> dict[str, Any]:
    """One ``records.jsonl`` line: the request and every ECSO step's output."""
    return {**row_fields(row), **asdict(record)}


def ecso_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How often the self-check fired per label, and how often the delivered answer changed."""
    return {
        "n": len(records),
        "n_harmful": sum(r["label"] == HARMFUL for r in records),
        "n_benign": sum(r["label"] == BENIGN for r in records),
        "judged_harmful_rate_harmful": rate(records, "judged_harmful", HARMFUL),
        "judged_harmful_rate_benign": rate(records, "judged_harmful", BENIGN),
        "changed_rate": sum(bool(r["changed"]) for r in records) / len(records) if records else None,
    }


def guard_record(row: Mapping[str, Any], guarded: GuardedResponse) -> dict[str, Any]:
    """One ``responses.jsonl`` line: the request, the decision, the answer, ECSO's steps and timings."""
    return {**row_fields(row), **response_record(guarded)}


def guard_summary(records: Sequence[Mapping[str, Any]], policy: str = "lsi") -> dict[str, Any]:
    """Per label: how often the guard refused outright and how often it sent the request to ECSO."""
    ecso = [{**r, "ecso_routed": r.get("action") == "ecso"} for r in records]
    seconds = [r["seconds"]["total"] for r in records if isinstance(r.get("seconds"), Mapping)]
    return {
        "policy": policy,
        "n": len(records),
        "n_harmful": sum(r["label"] == HARMFUL for r in records),
        "n_benign": sum(r["label"] == BENIGN for r in records),
        "refusal_rate_harmful": rate(records, "refused", HARMFUL),
        "refusal_rate_benign": rate(records, "refused", BENIGN),
        "ecso_rate_harmful": rate(ecso, "ecso_routed", HARMFUL),
        "ecso_rate_benign": rate(ecso, "ecso_routed", BENIGN),
        "check_errors": sum(r.get("error") is not None for r in records),
        "mean_seconds": sum(seconds) / len(seconds) if seconds else None,
    }
