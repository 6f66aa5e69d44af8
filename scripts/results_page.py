"""Write the documentation's results page from a finished run's metrics files.

    python scripts/results_page.py [--run DIR] [--out docs/results.md]

Reads, under the run folder, ``data/eval/metrics.json`` and ``data/eval/comparison.md`` (the evaluate
stage), ``data/sweep/sweep.json`` (the layer and detector sweep), ``data/calibration/metrics.json``
(tau), ``data/sanity/metrics.json`` (the everyday set), ``data/guard/summary.json`` (the guard stage)
and, when present, every ``data/compare/<suite>/metrics.json`` (the defence comparison). Every
figure on the page comes from those files; the page names the commit and run record they carry.
A missing file stops the script with exit status 2 and a line naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

EVAL_METRICS = Path("data/eval/metrics.json")
EVAL_COMPARISON = Path("data/eval/comparison.md")
SWEEP = Path("data/sweep/sweep.json")
CALIBRATION = Path("data/calibration/metrics.json")
SANITY = Path("data/sanity/metrics.json")
GUARD = Path("data/guard/summary.json")
COMPARE_DIR = Path("data/compare")
REQUIRED = (EVAL_METRICS, EVAL_COMPARISON, SWEEP, CALIBRATION, SANITY, GUARD)

DASH = "-"


class MissingRunFile(Exception):
    """A metrics file the page needs is not in the run folder."""


# ---------------------------------------------------------------- reading


def read_json(run: Path, rel: Path) -> dict[str, Any]:
    path = run / rel
    if not path.is_file():
        raise MissingRunFile(f"{path}: missing (this page needs a finished run: bash scripts/run.sh)")
    try:
        # The evaluate stage writes NaN where a metric is undefined; json reads it as float("nan").
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MissingRunFile(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MissingRunFile(f"{path}: expected a JSON object")
    return data


def read_text(run: Path, rel: Path) -> str:
    path = run / rel
    if not path.is_file():
        raise MissingRunFile(f"{path}: missing (this page needs a finished run: bash scripts/run.sh)")
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- formatting


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else DASH


def signed(x: Any, digits: int = 3) -> str:
    return f"{x:+.{digits}f}" if _finite(x) else DASH


def with_interval(d: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """``0.866 [0.846, 0.883]`` from ``key``, ``key_low`` and ``key_high``; ``-`` when undefined."""
    return _interval(d, key, lambda x: f"{x:.{digits}f}")


def pct_interval(d: Mapping[str, Any], key: str) -> str:
    """``75.0% [50.5%, 89.8%]`` for a rate stored as a share."""
    return _interval(d, key, lambda x: f"{100 * x:.1f}%")


def _interval(d: Mapping[str, Any], key: str, fmt: Callable[[float], str]) -> str:
    value = d.get(key)
    if not _finite(value):
        return DASH
    low, high = d.get(f"{key}_low"), d.get(f"{key}_high")
    if _finite(low) and _finite(high):
        return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"
    return fmt(value)


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def code(text: Any) -> str:
    return f"`{text}`"


def detector_label(name: str, shipped: str) -> str:
    return f"**`{name}` (shipped)**" if name == shipped else code(name)


# The order the evaluate stage's own tables use; a detector not named here follows, in file order.
DETECTOR_ORDER = (
    "lsi",
    "logreg_plain",
    "logreg_plain_all",
    "logreg_hs_delta",
    "logreg_hs",
    "logreg_delta",
    "refusal_direction",
    "length_only",
    "style_only",
)


def shipped_first(names: Iterable[str], shipped: str) -> list[str]:
    """The shipped detector, then the others in the evaluate stage's order."""
    names = list(names)
    rank = {name: i for i, name in enumerate(DETECTOR_ORDER)}
    rest = sorted((n for n in names if n != shipped), key=lambda n: (rank.get(n, len(rank)), names.index(n)))
    return ([shipped] if shipped in names else []) + rest


def count(share: Any, n: Any) -> str:
    if not (_finite(share) and _finite(n)):
        return DASH
    return f"{round(share * n)} of {int(n)}"


# ---------------------------------------------------------------- sections


def run_section(records: Mapping[str, Mapping[str, Any]]) -> str:
    """The run record every metrics file carries, and whether they agree."""
    first = next(iter(records.values()))
    commits = {str(r.get("git_commit", "unknown")) for r in records.values()}
    dirty = {str(r.get("git_dirty", "unknown")) for r in records.values()}
    libraries = first.get("libraries") or {}
    out = ["## The run these figures come from", ""]
    if len(commits) == 1:
        commit = commits.pop()
        dirty_text = {
            "True": "tracked files differed from it when the run was made",
            "False": "no tracked file differed from it",
        }.get(dirty.pop() if len(dirty) == 1 else "", "whether tracked files differed from it varies by file")
        out.append(f"Every metrics file below comes from commit `{commit}` ({dirty_text}).")
    else:
        out.append("The metrics files come from different commits; each file's is in the table below.")
    out += [
        "",
        table(
            ["field", "value"],
            [
                ["model", code(first.get("model_name", DASH))],
                ["model revision", code(first.get("model_revision", DASH))],
                ["project version", code(first.get("project_version", DASH))],
                ["Python", code(first.get("python", DASH))],
                ["device", code(first.get("device", DASH))],
                ["libraries", ", ".join(f"{k} `{v}`" for k, v in sorted(libraries.items())) or DASH],
            ],
        ),
        "",
        table(
            ["file", "git commit", "tracked files differed", "stage wall time (s)"],
            [
                [
                    code(path),
                    code(str(r.get("git_commit", "unknown"))[:12]),
                    str(r.get("git_dirty", "unknown")).lower(),
                    num(r.get("wall_time_s"), 1),
                ]
                for path, r in records.items()
            ],
        ),
    ]
    return "\n".join(out)


def choices_section(ev: Mapping[str, Any], sweep: Mapping[str, Any], cal: Mapping[str, Any]) -> str:
    shipped = ev.get("shipped", {})
    best = sweep.get("best", {})
    layers = sweep.get("layers", [])
    out = [
        "## What the run chose",
        "",
        table(
            ["choice", "value", "file"],
            [
                ["stored layers", ", ".join(str(x) for x in layers) or DASH, code(SWEEP)],
                [
                    "fusion / safety layer",
                    f"{best.get('fusion_layer', DASH)} / {best.get('safety_layer', DASH)}",
                    code(SWEEP),
                ],
                ["sweep ranked pairs by", code(sweep.get("select_by", DASH)), code(SWEEP)],
                ["held-out groups", code(sweep.get("held_out_by", DASH)), code(SWEEP)],
                ["shipped detector", code(shipped.get("describe", shipped.get("detector", DASH))), code(EVAL_METRICS)],
                ["tau", num(cal.get("tau"), 4), code(CALIBRATION)],
                [
                    "tau chosen by",
                    f"{code(cal.get('method', DASH))}, target FPR {num(cal.get('target_fpr'), 2)}, "
                    f"scaling {code((cal.get('scaling') or {}).get('kind', DASH))}",
                    code(CALIBRATION),
                ],
                [
                    "on the calibration split",
                    f"FPR {num(cal.get('calib_fpr'))}, TPR {num(cal.get('calib_tpr'))} "
                    f"({cal.get('n_harmful', DASH)} harmful, {cal.get('n_benign', DASH)} benign rows)",
                    code(CALIBRATION),
                ],
            ],
        ),
        "",
        f"The sweep's candidates, by mean AUROC on held-out {sweep.get('held_out_by', 'group')}s' *validation* "
        "rows (test rows are never read to choose):",
        "",
    ]
    detectors = sweep.get("detectors", [])
    ranked = sorted(detectors, key=lambda d: -d["held_out_auroc"] if _finite(d.get("held_out_auroc")) else math.inf)
    shipped_name = shipped.get("detector", "")
    out.append(
        table(
            ["detector", "mean held-out validation AUROC"],
            [[detector_label(d.get("name", DASH), shipped_name), num(d.get("held_out_auroc"))] for d in ranked],
        )
    )
    return "\n".join(out)


def held_out_headline(ev: Mapping[str, Any]) -> str:
    by = ev.get("held_out_by", "upstream")
    summary = ev.get("held_out", {}).get(by) or ev.get("held_out_summary", {})
    shipped = ev.get("shipped", {}).get("detector", "")
    names = shipped_first(summary, shipped)
    groups: list[str] = []
    for name in names:
        for g in summary[name].get("per_group", {}):
            if g not in groups:
                groups.append(g)
    rows = []
    for name in names:
        s = summary[name]
        per = s.get("per_group", {})
        rows.append(
            [detector_label(name, shipped), with_interval(s, "mean_auroc"), with_interval(s, "min_auroc")]
            + [num(per.get(g, {}).get("auroc")) for g in groups]
        )
    return "\n".join(
        [
            f"## Held out by {by}: the headline",
            "",
            f"Each {by} left out of training, validation and calibration in turn, every detector refitted without "
            "it and scored on all its rows; AUROC with its 95% stratified-bootstrap interval for the mean and the "
            f"lowest over the {by}s (`held_out.{by}` in `{EVAL_METRICS}`).",
            "",
            table(["detector", "mean AUROC", "lowest"] + [code(g) for g in groups], rows),
        ]
    )


def operating_point(ev: Mapping[str, Any], tau: Any) -> str:
    by = ev.get("held_out_by", "upstream")
    summary = ev.get("held_out", {}).get(by) or ev.get("held_out_summary", {})
    shipped = ev.get("shipped", {}).get("detector", "")
    per = summary.get(shipped, {}).get("per_group", {})
    rows = [
        [
            code(g),
            str(d.get("n", DASH)),
            with_interval(d, "tpr_at_5pct_fpr", 2),
            with_interval(d, "tpr_at_shipped_tau", 2),
            with_interval(d, "fpr_at_shipped_tau", 2),
        ]
        for g, d in per.items()
    ]
    return "\n".join(
        [
            f"## The operating point per held-out {by}",
            "",
            f"The shipped `{shipped}`, each {by} held out: TPR at 5% FPR (stratified bootstrap), and at the run's own "
            f"tau ({num(tau, 4)}) the share of the {by}'s harmful requests flagged (recall) and of its benign requests "
            "flagged (false refusals), with Wilson intervals; `-` where it has none of that label.",
            "",
            table([by, "rows", "TPR at 5% FPR", "harmful flagged at tau", "benign flagged at tau"], rows),
        ]
    )


def secondary_views(ev: Mapping[str, Any]) -> str:
    held = ev.get("held_out", {})
    by = ev.get("held_out_by", "upstream")
    views = [v for v in ("presentation", "source") if v in held and v != by]
    if not views:
        return ""
    shipped = ev.get("shipped", {}).get("detector", "")
    names = shipped_first(held[views[0]], shipped)
    header = ["detector"]
    for v in views:
        header += [f"by {v}: mean AUROC", f"by {v}: lowest"]
    rows = []
    for name in names:
        row = [detector_label(name, shipped)]
        for v in views:
            s = held[v].get(name, {})
            row += [with_interval(s, "mean_auroc"), with_interval(s, "min_auroc")]
        rows.append(row)
    out = [
        "## Held out by " + " and by ".join(views),
        "",
        "The same protocol with each " + " or each ".join(views) + " left out in turn (the by-source view is "
        "secondary: sources cut from one upstream are siblings). Per-group figures are in the full tables below.",
        "",
        table(header, rows),
    ]
    for v in views:
        per = held[v].get(shipped, {}).get("per_group", {})
        if per:
            worst = sorted(
                ((g, d.get("auroc")) for g, d in per.items() if _finite(d.get("auroc"))), key=lambda item: item[1]
            )[:3]
            out += [
                "",
                f"Lowest {v}s for the shipped detector: " + ", ".join(f"`{g}` {num(a)}" for g, a in worst) + ".",
            ]
    return "\n".join(out)


def paired_section(ev: Mapping[str, Any]) -> str:
    paired = ev.get("paired")
    if not paired:
        return ""
    ref = paired.get("reference", "")
    in_source, mean = paired.get("in_source", {}), paired.get("held_out_mean", {})

    def cell(d: Mapping[str, Any] | None) -> str:
        if not d or not _finite(d.get("difference")):
            return DASH
        return f"{signed(d['difference'])} [{signed(d.get('low'))}, {signed(d.get('high'))}], p {num(d.get('p_value'))}"

    rows = [
        [code(name), cell(in_source.get(name)), cell(mean.get(name))] for name in shipped_first(mean or in_source, ref)
    ]
    resamples = paired.get("resamples", DASH)
    return "\n".join(
        [
            "## The shipped detector against the others, tested",
            "",
            f"`{ref}`'s {paired.get('metric', 'auroc').upper()} minus each other detector's on the same rows: "
            f"difference [95% paired-bootstrap interval], two-sided p ({resamples} resamples). An interval that "
            "excludes 0 is a difference the rows support. The per-group tests are in the full tables below.",
            "",
            table(["against", "in-source (test split)", "mean over held-out groups"], rows),
        ]
    )


def in_source_section(ev: Mapping[str, Any]) -> str:
    detectors = ev.get("detectors", {})
    shipped = ev.get("shipped", {}).get("detector", "")
    names = shipped_first(detectors, shipped)
    n = next((detectors[x].get("n") for x in names if "n" in detectors[x]), DASH)
    rows = [
        [
            detector_label(name, shipped),
            with_interval(detectors[name], "auroc"),
            with_interval(detectors[name], "tpr_at_5pct_fpr", 2),
            with_interval(detectors[name], "fpr", 3),
        ]
        for name in names
    ]
    return "\n".join(
        [
            "## In-source, the test split",
            "",
            f"Every detector on the {n}-row test split of the sources it was trained on (the number that "
            "overstates). TPR at 5% FPR with its stratified-bootstrap interval; FPR at each detector's own tau, "
            "Wilson interval.",
            "",
            table(["detector", "AUROC", "TPR at 5% FPR", "FPR at tau"], rows),
        ]
    )


def everyday_section(san: Mapping[str, Any], tau: Any) -> str:
    rows = [
        [
            "all",
            str(san.get("n", DASH)),
            with_interval(san, "accuracy"),
            f"{count(san.get('harmful_refused'), san.get('n_harmful'))} ({with_interval(san, 'harmful_refused', 2)})",
            f"{count(san.get('benign_answered'), san.get('n_benign'))} ({with_interval(san, 'benign_answered', 2)})",
        ]
    ]
    for kind, d in (san.get("per_input") or {}).items():
        rows.append(
            [
                kind,
                str(d.get("n", DASH)),
                with_interval(d, "accuracy"),
                f"{count(d.get('harmful_refused'), d.get('n_harmful'))} ({with_interval(d, 'harmful_refused', 2)})",
                f"{count(d.get('benign_answered'), d.get('n_benign'))} ({with_interval(d, 'benign_answered', 2)})",
            ]
        )
    return "\n".join(
        [
            "## The everyday set",
            "",
            "The run's guard (the check only, at tau "
            f"{num(tau, 4)}) on `data/demo/everyday.jsonl`: everyday requests written fresh, never a training "
            f"source. Wilson intervals; {san.get('n_errors', 0)} failed checks.",
            "",
            table(["requests", "n", "accuracy", "harmful refused", "benign answered"], rows),
        ]
    )


def guard_section(g: Mapping[str, Any]) -> str:
    rows = [
        [
            "harmful refused",
            f"{count(g.get('refusal_rate_harmful'), g.get('n_harmful'))}",
            pct_interval(g, "refusal_rate_harmful"),
        ],
        [
            "benign refused",
            f"{count(g.get('refusal_rate_benign'), g.get('n_benign'))}",
            pct_interval(g, "refusal_rate_benign"),
        ],
        [
            "harmful through ECSO",
            f"{count(g.get('ecso_rate_harmful'), g.get('n_harmful'))}",
            pct_interval(g, "ecso_rate_harmful"),
        ],
        [
            "benign through ECSO",
            f"{count(g.get('ecso_rate_benign'), g.get('n_benign'))}",
            pct_interval(g, "ecso_rate_benign"),
        ],
    ]
    return "\n".join(
        [
            "## Guarded generation",
            "",
            f"The `guard` stage: policy `{g.get('policy', DASH)}` on a balanced sample of {g.get('n', DASH)} test "
            f"requests, {num(g.get('mean_seconds'), 2)} s a request on average, "
            f"{g.get('check_errors', 0)} failed checks; Wilson intervals.",
            "",
            table(["", "count", "share"], rows),
        ]
    )


def compare_section(run: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    root = run / COMPARE_DIR
    records: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return "", records
    parts: list[str] = []
    for path in sorted(root.glob("*/metrics.json")):
        rel = path.relative_to(run)
        data = read_json(run, rel)
        if isinstance(data.get("run"), dict):
            records[str(rel)] = data["run"]
        rows = []
        order = list(data.get("defences") or [])
        for bench, defences in (data.get("benchmarks") or {}).items():
            for defence in order + [x for x in defences if x not in order]:
                d = defences.get(defence)
                if not isinstance(d, dict):
                    continue
                basis = " (not refused)" if d.get("asr_basis") == "not_refused" else ""
                rows.append(
                    [
                        code(bench),
                        code(defence),
                        pct_interval(d, "harmful_refusal_rate"),
                        pct_interval(d, "attack_success_rate") + basis,
                        pct_interval(d, "benign_answer_rate"),
                        pct_interval(d, "ecso_rate"),
                        num(d.get("mean_seconds")),
                        signed(d.get("added_seconds")),
                    ]
                )
        n = ", ".join(f"`{k}` {v}" for k, v in (data.get("n_examples") or {}).items())
        parts += [
            f"### Suite `{data.get('suite', path.parent.name)}`",
            "",
            f"`{rel}`: judge `{data.get('judge', DASH)}`, detector `{data.get('detector', DASH)}`, tau "
            f"{num(data.get('tau'), 4)}; examples: {n or DASH}; Wilson intervals.",
            "",
            table(
                [
                    "benchmark",
                    "defence",
                    "harmful refused",
                    "attack success",
                    "benign answered",
                    "through ECSO",
                    "mean s",
                    "added s",
                ],
                rows,
            ),
            "",
        ]
    if not parts:
        return "", records
    return "\n".join(["## The defence comparison", "", *parts]).rstrip(), records


def demote_headings(markdown: str) -> str:
    """Nest a file's headings one level under the page's own."""
    out = []
    for line in markdown.splitlines():
        out.append("#" + line if line.startswith("#") else line)
    return "\n".join(out)


# ---------------------------------------------------------------- the page


def build_page(run: Path) -> str:
    ev = read_json(run, EVAL_METRICS)
    comparison = read_text(run, EVAL_COMPARISON)
    sweep = read_json(run, SWEEP)
    cal = read_json(run, CALIBRATION)
    san = read_json(run, SANITY)
    guard = read_json(run, GUARD)
    compare_md, compare_records = compare_section(run)

    records: dict[str, dict[str, Any]] = {}
    for rel, data in ((SWEEP, sweep), (CALIBRATION, cal), (EVAL_METRICS, ev), (GUARD, guard), (SANITY, san)):
        if isinstance(data.get("run"), dict):
            records[str(rel)] = data["run"]
    records.update(compare_records)
    if not records:
        raise MissingRunFile(f"{run / EVAL_METRICS}: no run record (`run`) in any metrics file")

    tau = cal.get("tau")
    sections = [
        "# Results of the current run",
        "",
        "<!-- Generated by scripts/results_page.py from the run's metrics files; edit the script, not this page. -->",
        "",
        "This page is written by `python scripts/results_page.py --run . --out docs/results.md` from the metrics "
        "files of a finished run (`bash scripts/run.sh`); every figure is read from those files. What the figures "
        "mean, which targets they meet and what limits them is discussed in [Findings](findings.md).",
        "",
        run_section(records),
        "",
        choices_section(ev, sweep, cal),
        "",
        held_out_headline(ev),
        "",
        operating_point(ev, tau),
        "",
    ]
    for extra in (secondary_views(ev), paired_section(ev), in_source_section(ev), everyday_section(san, tau)):
        if extra:
            sections += [extra, ""]
    sections += [guard_section(guard), ""]
    if compare_md:
        sections += [compare_md, ""]
    sections += [
        f"## Full evaluation tables (`{EVAL_COMPARISON}`)",
        "",
        "The evaluate stage's own tables, as it wrote them: each held-out view per group with AUROC / TPR at 5% "
        "FPR / share of benign rows flagged, the paired tests per group, and every source in-source and held out.",
        "",
        demote_headings(comparison.strip()),
        "",
    ]
    return "\n".join(sections)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("."), help="the run's project folder (default: .)")
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"), help="the page to write")
    args = parser.parse_args(argv)
    try:
        page = build_page(args.run)
    except MissingRunFile as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_atomic(args.out, page)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
