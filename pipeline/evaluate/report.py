"""One self-contained HTML page per run: configuration, detectors, defence comparison, figures, examples.

Everything the page shows is read from the run's own outputs (``params.yaml``, the evaluation
metrics, the comparison summaries and rows, the PNG figures) and embedded, images included, so
the file opens in any browser with no network and can be mailed as it is. Request texts and
model answers are adversarial input: the template escapes every value (Jinja2 autoescape).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined, select_autoescape
from PIL import Image

from pipeline.evaluate.intervals import PairedDifference, interval_of

# Detector names in evaluation metrics -> what a reader should call them.
DETECTOR_LABELS: dict[str, str] = {
    "lsi": "LSI (the method)",
    "logreg_hs_delta": "logistic regression on [h_s, delta_h]",
    "logreg_hs": "logistic regression on h_s",
    "logreg_delta": "logistic regression on delta_h",
    "logreg_plain": "logistic regression on the plain request",
    "logreg_plain_all": "logistic regression on the plain request, all stored layers",
    "refusal_direction": "refusal direction (training-free)",
    "length_only": "length only",
    "style_only": "style only",
}
DEFENCE_LABELS: dict[str, str] = {
    "none": "no defence",
    "lsi": "LSI",
    "ecso": "ECSO",
    "lsi_then_ecso": "LSI then ECSO",
}
# What a showcase example illustrates, in the order the page lists them.
SHOWCASE_KINDS: tuple[tuple[str, str], ...] = (
    ("refused", "harmful request refused by LSI"),
    ("missed", "harmful request LSI let through"),
    ("ecso_changed", "answer ECSO replaced"),
    ("over_refused", "benign request LSI refused"),
    ("answered", "benign request answered"),
)
RESPONSE_CHARS = 700
THUMBNAIL_PX = 280


def in_order(mapping: Mapping[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """``mapping`` with the keys in ``order`` first, in that order, then any others as they come.

    JSON files are written with sorted keys; tables read better in the method's own order
    (LSI before its baselines, no defence before the defences).
    """
    first = [key for key in order if key in mapping]
    return {key: mapping[key] for key in [*first, *(key for key in mapping if key not in first)]}


def order_summary(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A comparison summary with each benchmark's defences in :data:`DEFENCE_LABELS` order."""
    return {benchmark: in_order(per, list(DEFENCE_LABELS)) for benchmark, per in summary.items()}


@dataclass(frozen=True, kw_only=True)
class SuiteResult:
    """One comparison suite's outputs: its meta, :func:`~pipeline.evaluate.comparison.summarise` result, row records."""

    name: str
    meta: Mapping[str, Any]
    summary: Mapping[str, Any]
    rows: Sequence[Mapping[str, Any]]
    figure: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ReportInputs:
    """Everything one report shows; absent parts (no evaluation, no sweep) are left out of the page."""

    title: str
    params_text: str
    facts: Sequence[tuple[str, str]]
    detectors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cross_source: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    paired: Mapping[str, Any] = field(default_factory=dict)
    intervals: Mapping[str, Any] = field(default_factory=dict)
    suites: Sequence[SuiteResult] = ()
    figures: Sequence[tuple[str, Path]] = ()
    notes: Sequence[str] = ()
    run: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Showcase:
    """One example on the page: why it was picked, the request, and each defence's row."""

    kind: str
    benchmark: str
    example_id: str
    category: str
    label: int
    text: str
    image: str | None
    rows: Sequence[Mapping[str, Any]]


def _group(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Mapping[str, Any]]]:
    """Rows by (benchmark, example_id), then by defence, in row order."""
    grouped: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["benchmark"], row["example_id"]), {})[row["defence"]] = row
    return grouped


def _kind(by_defence: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Which showcase kind an example is, or None when it illustrates nothing (or failed)."""
    if any(row.get("error") for row in by_defence.values()):
        return None
    lsi, ecso = by_defence.get("lsi"), by_defence.get("ecso")
    label = next(iter(by_defence.values()))["label"]
    if ecso is not None and ecso.get("ecso") and ecso["ecso"].get("changed"):
        return "ecso_changed"
    if lsi is None:
        return None
    if label == 1:
        return "refused" if lsi["action"] == "refuse" else "missed"
    return "over_refused" if lsi["action"] == "refuse" else "answered"


def pick_showcase(rows: Sequence[Mapping[str, Any]], count: int) -> list[Showcase]:
    """Up to ``count`` examples that show the defences at work, taking the kinds in turn.

    Refusals with the highest LSI score come first; the other kinds keep the rows' (suite) order.
    Deterministic for the same rows.
    """
    by_kind: dict[str, list[tuple[tuple[str, str], dict[str, Mapping[str, Any]]]]] = {k: [] for k, _ in SHOWCASE_KINDS}
    for key, by_defence in _group(rows).items():
        kind = _kind(by_defence)
        if kind is not None:
            by_kind[kind].append((key, by_defence))
    by_kind["refused"].sort(key=lambda item: -(item[1]["lsi"].get("score") or 0.0))
    picked: list[Showcase] = []
    depth = 0
    while len(picked) < count and any(depth < len(items) for items in by_kind.values()):
        for kind, _ in SHOWCASE_KINDS:
            items = by_kind[kind]
            if depth < len(items) and len(picked) < count:
                (benchmark, example_id), by_defence = items[depth]
                first = next(iter(by_defence.values()))
                picked.append(
                    Showcase(
                        kind=kind,
                        benchmark=benchmark,
                        example_id=example_id,
                        category=first["category"],
                        label=first["label"],
                        text=first["text"],
                        image=first.get("image"),
                        rows=list(by_defence.values()),
                    )
                )
        depth += 1
    return picked


def png_data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI, embedded as it is."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def thumbnail_data_uri(path: Path, size: int = THUMBNAIL_PX) -> str | None:
    """A small PNG of any image file as a ``data:`` URI; None when the file is missing or unreadable."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _shown(row: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """A metric with its interval when ``row`` holds one (``0.860 [0.790, 0.920]``), else the value alone."""
    interval = interval_of(row, key)
    return interval.format(digits) if interval is not None else _number(row.get(key), digits)


def _rate(row: Mapping[str, Any], key: str) -> str:
    """A rate as a percentage with its interval when ``row`` holds one (``62.5% [38.6%, 81.5%]``)."""
    interval = interval_of(row, key)
    return interval.percent() if interval is not None and row.get(key) is not None else _percent(row.get(key))


def _gap(record: Mapping[str, Any] | None) -> str:
    """One paired test: ``+0.052 [+0.011, +0.094], p 0.012``."""
    return "–" if record is None else PairedDifference(**record).format()


def _intervals_note(intervals: Mapping[str, Any]) -> str:
    """What the brackets in the detector tables are, from the evaluation's own record of it."""
    if not intervals:
        return ""
    return (
        f"Brackets: {100 * intervals['confidence']:g}% intervals; stratified bootstrap "
        f"({intervals['bootstrap_resamples']} resamples, harmful and benign rows resampled separately) for AUROC, "
        "AUPRC, TPR at a fixed FPR and F1, Wilson score intervals for rates at tau."
    )


def _clip(text: str, limit: int = RESPONSE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_rows(run: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A ``run`` record (:func:`pipeline.run_record.build_run_record`) as the rows of a small table."""
    if not run:
        return []
    state = ", with uncommitted changes" if run.get("git_dirty") is True else ""
    libraries = run.get("libraries") or {}
    return [
        ("code", f"lsi-guard {run.get('project_version', '?')}, commit {run.get('git_commit', 'unknown')}{state}"),
        (
            "Python and libraries",
            ", ".join([f"Python {run.get('python', '?')}", *(f"{name} {v}" for name, v in libraries.items())]),
        ),
        ("device", str(run.get("device", "?"))),
        ("model", f"{run.get('model_name', '?')} (revision {run.get('model_revision', '?')})"),
        ("wall time", f"{run.get('wall_time_s', '?')} s"),
    ]


def _environment() -> Environment:
    env = Environment(
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(percent=_percent, number=_number, clip=_clip)
    env.globals.update(
        detector_label=lambda n: DETECTOR_LABELS.get(n, n),
        defence_label=DEFENCE_LABELS.get,
        shown=_shown,
        rate=_rate,
        gap=_gap,
        run_rows=run_rows,
    )
    return env


def render_report(inputs: ReportInputs, examples_per_suite: int = 6) -> str:
    """The report page as one HTML string (every image embedded, every value escaped)."""
    template = resources.files("pipeline.evaluate").joinpath("templates/report.html.j2")
    template_text = template.read_text(encoding="utf-8")
    template = _environment().from_string(template_text)
    suites = [
        {
            "result": suite,
            "summary": order_summary(suite.summary),
            "figure": png_data_uri(suite.figure) if suite.figure is not None and suite.figure.is_file() else None,
            "showcase": [
                {"case": case, "thumbnail": thumbnail_data_uri(Path(case.image)) if case.image else None}
                for case in pick_showcase(suite.rows, examples_per_suite)
            ],
        }
        for suite in inputs.suites
    ]
    figures = [(caption, png_data_uri(path)) for caption, path in inputs.figures if path.is_file()]
    detector_order = list(DETECTOR_LABELS)
    return template.render(
        inputs=inputs,
        detectors=in_order(inputs.detectors, detector_order),
        cross_source={source: in_order(per, detector_order) for source, per in inputs.cross_source.items()},
        suites=suites,
        figures=figures,
        showcase_kinds=dict(SHOWCASE_KINDS),
        cross_detectors=list(DETECTOR_LABELS),
        paired=inputs.paired,
        intervals_note=_intervals_note(inputs.intervals),
    )
