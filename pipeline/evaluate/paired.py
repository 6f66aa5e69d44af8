"""The reference detector (LSI) against each baseline on the same rows: paired bootstrap tests of the AUROC gap.

In-source, both detectors' scores on the test split are resampled together. Held out, each source
is resampled on its own (harmful and benign rows separately, its own stream), every detector
scored on the same draws; the mean over sources of those per-source draws is the bootstrap
distribution of the mean held-out AUROC, the study's headline, so its gap gets a test too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.evaluate.intervals import (
    BootstrapSpec,
    Interval,
    PairedDifference,
    paired_bootstrap,
    paired_difference,
    percentile_interval,
    stratified_weights,
    weighted_ranking_metrics,
)
from pipeline.evaluate.markdown import markdown_table

METRIC = "auroc"
# Stream ids: in-source draws and each held-out source's draws come from separate generators.
IN_SOURCE_STREAM = 0
HELD_OUT_STREAM = 1


def in_source_paired(
    reference: str, labels: np.ndarray, scores: Mapping[str, np.ndarray], spec: BootstrapSpec
) -> dict[str, PairedDifference]:
    """``reference``'s AUROC minus each other detector's on the same rows (one paired bootstrap each)."""
    return {
        name: paired_bootstrap(labels, scores[reference], other, spec, METRIC, stream=(IN_SOURCE_STREAM,))
        for name, other in scores.items()
        if name != reference
    }


@dataclass(frozen=True, kw_only=True)
class HeldOutComparison:
    """Held-out AUROC intervals per detector and the reference's paired gaps to each baseline.

    ``mean_auroc`` / ``min_auroc``: per detector, the mean and lowest AUROC over held-out sources
    with their intervals. ``per_source``: ``{source: {baseline: gap}}``; ``mean``: ``{baseline: gap}``
    in mean held-out AUROC. A gap is reference minus baseline.
    """

    mean_auroc: dict[str, Interval]
    min_auroc: dict[str, Interval]
    per_source: dict[str, dict[str, PairedDifference]]
    mean: dict[str, PairedDifference]


def held_out_comparison(
    reference: str,
    labels: Mapping[str, np.ndarray],
    scores: Mapping[str, Mapping[str, np.ndarray]],
    spec: BootstrapSpec,
) -> HeldOutComparison:
    """The paired bootstrap over held-out sources; ``labels`` / ``scores`` per source, on all its rows.

    A source with one label only has no AUROC: its gaps are NaN and the means skip it.
    """
    sources = list(labels)
    points: dict[str, dict[str, float]] = {}
    draws: dict[str, dict[str, np.ndarray]] = {}
    for position, source in enumerate(sources):
        y = np.asarray(labels[source]).astype(int)
        by_name = scores[source]
        if len(np.unique(y)) < 2:
            points[source] = dict.fromkeys(by_name, math.nan)
            draws[source] = {name: np.full(spec.resamples, math.nan) for name in by_name}
            continue
        weights = stratified_weights(y, spec.resamples, spec.rng(HELD_OUT_STREAM, position))
        points[source] = {
            name: float(weighted_ranking_metrics(y, s, np.ones((1, len(y))))[METRIC][0]) for name, s in by_name.items()
        }
        draws[source] = {name: weighted_ranking_metrics(y, s, weights)[METRIC] for name, s in by_name.items()}
    names = list(scores[sources[0]]) if sources else []
    defined = [source for source in sources if not math.isnan(points[source].get(reference, math.nan))]

    def pooled(name: str, reduce: Any) -> tuple[float, np.ndarray]:
        if not defined:
            return math.nan, np.full(spec.resamples, math.nan)
        point = float(reduce([points[source][name] for source in defined]))
        return point, reduce(np.vstack([draws[source][name] for source in defined]), axis=0)

    mean_auroc = {name: percentile_interval(*pooled(name, np.mean), spec.confidence) for name in names}
    min_auroc = {name: percentile_interval(*pooled(name, np.min), spec.confidence) for name in names}
    per_source = {
        source: {
            name: paired_difference(
                points[source][reference] - points[source][name],
                draws[source][reference] - draws[source][name],
                spec.confidence,
            )
            for name in names
            if name != reference
        }
        for source in sources
    }
    mean: dict[str, PairedDifference] = {}
    for name in names:
        if name == reference:
            continue
        ref_point, ref_draws = pooled(reference, np.mean)
        point, other_draws = pooled(name, np.mean)
        mean[name] = paired_difference(ref_point - point, ref_draws - other_draws, spec.confidence)
    return HeldOutComparison(mean_auroc=mean_auroc, min_auroc=min_auroc, per_source=per_source, mean=mean)


def paired_record(
    reference: str,
    spec: BootstrapSpec,
    in_source: Mapping[str, PairedDifference],
    held_out: HeldOutComparison | None,
) -> dict[str, Any]:
    """The ``paired`` section of ``metrics.json``: what was compared, how, and every gap."""
    record: dict[str, Any] = {
        "reference": reference,
        "metric": METRIC,
        "confidence": spec.confidence,
        "resamples": spec.resamples,
        "in_source": {name: gap.record() for name, gap in in_source.items()},
    }
    if held_out is not None:
        record["held_out_mean"] = {name: gap.record() for name, gap in held_out.mean.items()}
        record["held_out"] = {
            source: {name: gap.record() for name, gap in gaps.items()} for source, gaps in held_out.per_source.items()
        }
    return record


def _gap(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return "–"
    gap = PairedDifference(**record)
    return gap.format()


def paired_markdown(record: Mapping[str, Any], order: Sequence[str] = ()) -> str:
    """The paired tests as a Markdown table: one row per baseline, in-source, mean held out, then each source."""
    reference = record["reference"]
    held_out: Mapping[str, Mapping[str, Any]] = record.get("held_out", {})
    sources = list(held_out)
    head = ["baseline", "in-source", *(["mean held out"] if "held_out_mean" in record else []), *sources]
    rows = []
    names = [name for name in order if name in record["in_source"]]
    names += [name for name in record["in_source"] if name not in names]
    for name in names:
        cells = [name, _gap(record["in_source"].get(name))]
        if "held_out_mean" in record:
            cells.append(_gap(record["held_out_mean"].get(name)))
        cells += [_gap(held_out[source].get(name)) for source in sources]
        rows.append(cells)
    level = f"{100 * record['confidence']:g}%"
    note = (
        f"\n{reference} AUROC minus each baseline's on the same rows: difference [{level} paired bootstrap interval], "
        f"two-sided p ({record['resamples']} stratified resamples, both detectors scored on the same draws). "
        "An interval that excludes 0 is a difference the rows support; one that includes it is not. "
        "Mean held out: the gap in mean AUROC over held-out sources, each resampled on its own.\n"
    )
    return markdown_table(head, rows) + "\n" + note
