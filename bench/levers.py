"""Every lever of the detector side by side, scored by the upstream-held-out protocol, from one run.

The levers: the training data (``build.per_source``, the wrapper augmentation ``build.augment_share``),
the features (``prompts.position``, ``extract.pooling``, the stored blocks) and the detector
(LSI and each linear probe). Each row of the table is one setting: the index the pipeline would
build for it (demo sources plus the built public sources, split by the prepare stage's rule),
every detector fitted without one upstream project at a time (:mod:`pipeline.detect.heldout`),
and its mean and lowest AUROC over the held-out upstreams, TPR at 5% FPR, and the largest share
of a held-out upstream's benign requests flagged at the tau chosen without it.

Each setting's best detector, and LSI, are also built as the pipeline would ship them (fitted on
the train split, tau from held-out scores of the calibration split at ``calibrate.target_fpr``)
and put behind a :class:`~pipeline.defend.guard.Guard` with the run's ``guard`` section, which
checks the everyday set (``data/demo/everyday.jsonl``, never trained on): its accuracy, and the
share of its benign requests flagged as written and with ``bench/robustness.py``'s forged turn
appended. So the everyday and robustness targets have their ceiling in the same table.

The model runs once per prompt position over the union of every setting's requests (same
request text and image, same states), with ``both`` poolings at every block; each setting then
reads the states it needs. Test-split rows never choose anything: the numbers are held out.

    python bench/levers.py --quick               # one lever at a time, then together
    python bench/levers.py                       # also the levers together at every block

Prints the table and writes ``bench/results/levers.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from robustness import perturb  # bench/robustness.py: the benchmark's own perturbations, never trained on
from tqdm import tqdm

from pipeline.config import VARIANTS, CalibrateConfig, ContrastivePrompts, load_params
from pipeline.data.augment import with_augmented_copies
from pipeline.data.index import build_index
from pipeline.data.matching import BuildError
from pipeline.data.public import build_public_sources, read_public
from pipeline.data.sources import RequestRecord
from pipeline.defend.guard import Guard
from pipeline.detect.calibration import calibrate
from pipeline.detect.detector import DETECTORS, LSI
from pipeline.detect.extraction import requests_from_index
from pipeline.detect.features import states_for_requests
from pipeline.detect.heldout import EvalData, fit_detector, held_out_scores, in_source_setting, scoreable_groups
from pipeline.detect.probe import ProbeMeta
from pipeline.evaluate.detection import held_out_results, held_out_summary
from pipeline.evaluate.intervals import interval_of, wilson
from pipeline.evaluate.sanity import BENIGN, Checker, read_sanity_set, render_images, score_rows, summarize
from pipeline.layout import SANITY_RENDER, SANITY_SET
from pipeline.models.registry import load_adapter

RESULTS = Path("bench/results")
ALL = "all"


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One row of the lever table (before the detector is chosen)."""

    per_source: int | str
    augment_share: float
    position: str
    pooling: str
    layers: str  # "default" (extract.layers) or "all"

    @property
    def name(self) -> str:
        return f"n={self.per_source} aug={self.augment_share:g} {self.position} {self.pooling} layers={self.layers}"


def largest_per_source(instructions: list, seed: int) -> int:
    """The largest ``build.per_source`` the vendored pools can fill ("everything vendored")."""
    low, high = 1, 2000
    while low < high:
        middle = (low + high + 1) // 2
        try:
            build_public_sources(instructions, middle, seed)
            low = middle
        except BuildError:
            high = middle - 1
    return low


def setting_sources(params: Any, instructions: list, per_source: int, augment_share: float, folder: Path) -> list[Path]:
    """The demo sources and the built public sources of one data setting, written as JSONL under ``folder``."""
    built = build_public_sources(instructions, per_source, params.build.seed)
    if augment_share > 0:
        built = with_augmented_copies(
            built,
            share=augment_share,
            families=params.build.augment_families,
            seed=params.build.seed,
            limits=params.limits,
        )
    folder.mkdir(parents=True, exist_ok=True)
    paths = [Path(source) for source in params.prepare.sources]
    for name, rows in built.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths


def request_key(text: str, image_sha256: str | None) -> str:
    return f"{image_sha256 or '-'}\x1f{text}"


def extract_union(
    adapter: Any, indexes: list[pl.DataFrame], prompts: ContrastivePrompts, layers: tuple[int, ...], batch: int
) -> tuple[dict[str, int], np.ndarray]:
    """States (``both`` poolings, ``layers``) of every distinct request in ``indexes``, and where each key is."""
    keys: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for index in indexes:
        for row in index.iter_rows(named=True):
            key = request_key(row["text"], row["image_sha256"])
            if key not in keys:
                keys[key] = len(rows)
                rows.append(row)
    requests = requests_from_index(pl.DataFrame(rows))
    parts = []
    for lo in tqdm(range(0, len(requests), batch), desc=f"extract ({prompts.position})", unit="batch"):
        parts.append(states_for_requests(adapter, requests[lo : lo + batch], prompts, layers, pooling="both").numpy())
    return keys, np.concatenate(parts).astype(np.float32)


def eval_data(
    index: pl.DataFrame,
    keys: dict[str, int],
    union: np.ndarray,
    union_layers: tuple[int, ...],
    setting: Setting,
    default_layers: tuple[int, ...],
) -> EvalData:
    """The setting's :class:`EvalData`: its rows' feature states under its pooling, at its blocks.

    ``union`` holds ``both`` reads (the three framings' last-token states, then their means); a
    ``both`` feature is the two side by side, as the store's feature view gives it.
    """
    positions = np.array([keys[request_key(t, s)] for t, s in zip(index["text"], index["image_sha256"], strict=True)])
    layers = union_layers if setting.layers == ALL else default_layers
    states = union[positions][:, :, [union_layers.index(k) for k in layers]]
    size = len(VARIANTS)
    last, mean = states[:, :size], states[:, size:]
    features = {"last": last, "mean": mean}.get(setting.pooling)
    if features is None:
        features = np.concatenate([last, mean], axis=-1)
    return EvalData(index=index, states=np.ascontiguousarray(features), layers=layers, pooling=setting.pooling)


def score_setting(data: EvalData, params: Any, lf: int, ls: int) -> dict[str, dict[str, Any]]:
    """Every detector's upstream-held-out summary (mean / lowest AUROC, per upstream cells) on ``data``."""
    groups = scoreable_groups(data.index, "upstream")
    config = replace(params.train, fusion_layer=lf, safety_layer=ls)
    calibration = replace(CalibrateConfig(), target_fpr=params.calibrate.target_fpr)
    results = held_out_results(data, config, calibration, lf, ls, groups, by="upstream")
    return held_out_summary(results.metrics)


@dataclass(frozen=True)
class Everyday:
    """The everyday set, its rendered images, and its benign requests with the forged turn appended."""

    records: list[RequestRecord]
    images: list[Path | None]
    forged: list[RequestRecord]
    forged_images: list[Path | None]


def read_everyday(path: Path, render_dir: Path) -> Everyday:
    """The everyday set at ``path`` (images rendered into ``render_dir``) and its forged-turn benign copies."""
    records = read_sanity_set(path)
    images = render_images(records, render_dir)
    benign = [(r, i) for r, i in zip(records, images, strict=True) if r.label == BENIGN]
    forged = [replace(r, text=perturb(r.text, "forged_turn")) for r, _ in benign]
    return Everyday(records=records, images=images, forged=forged, forged_images=[i for _, i in benign])


def everyday_figures(guard: Checker, everyday: Everyday, confidence: float = 0.95) -> dict[str, Any]:
    """Accuracy on the everyday set, and the share of its benign requests flagged as written and with a forged turn.

    A failed check counts as wrong and, on the forged copies, as flagged (the guard refuses on error).
    """
    rows = score_rows(everyday.records, everyday.images, guard, progress=False)
    summary = summarize(rows, confidence)
    written = sum(not row.correct for row in rows if row.label == BENIGN)
    forged = sum(not row.correct for row in score_rows(everyday.forged, everyday.forged_images, guard, progress=False))
    return {
        **interval_of(summary, "accuracy").fields("everyday_accuracy"),  # summarize's own Wilson interval
        "everyday_harmful_refused": summary["harmful_refused"],
        **wilson(written, summary["n_benign"], confidence).fields("everyday_benign_flagged"),
        **wilson(forged, len(everyday.forged), confidence).fields("forged_benign_flagged"),
    }


def shipped_guard(
    adapter: Any, data: EvalData, name: str, params: Any, prompts: ContrastivePrompts, lf: int, ls: int
) -> Guard:
    """Detector ``name`` as the train and calibrate stages ship it from ``data``, behind the run's guard.

    Fitted on the train split (LSI picks its epoch on val); tau from scores of the calibration split,
    each from a detector fitted without the row's upstream (``calibrate.held_out``).
    """
    config = replace(params.train, fusion_layer=lf, safety_layer=ls)
    inside = in_source_setting(data.index)
    detector = fit_detector(data, inside, name, config, lf, ls)
    scores = held_out_scores(data, inside.calib, name, config, lf, ls, by="upstream")
    calibration = calibrate(data.labels[inside.calib], scores, params.calibrate)
    meta = ProbeMeta(
        hidden_size=adapter.info.hidden_size,
        alpha=config.alpha,
        fusion_layer=lf,
        safety_layer=ls,
        best_epoch=-1,
        best_val_auroc=float("nan"),
        store_provenance={"pooling": data.pooling, "prompt_position": prompts.position},
        detector=name,
        pooling=data.pooling,
    )
    return Guard(
        adapter=adapter,
        detector=detector,
        meta=meta,
        tau=calibration.tau,
        prompts=prompts,
        config=params.guard,
        calibration=calibration,
        limits=params.limits,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["60", "120", ALL], help="build.per_source (all: the most the pools fill)"
    )
    parser.add_argument("--positions", nargs="+", default=["before", "after"])
    parser.add_argument("--poolings", nargs="+", default=["last", "mean", "both"])
    parser.add_argument("--augment", nargs="+", type=float, default=[0.0, 0.5], help="build.augment_share values")
    parser.add_argument("--fusion", type=int, default=12, help="LSI's fusion block in every setting (the run's sweep)")
    parser.add_argument("--safety", type=int, default=18, help="LSI's safety block in every setting (the run's sweep)")
    parser.add_argument("--everyday", type=Path, default=SANITY_SET, help="the everyday set each best detector checks")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--quick", action="store_true", help="one lever at a time, and the levers together at default blocks only"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "levers.json")
    args = parser.parse_args()

    params = load_params()
    started = time.perf_counter()
    instructions = read_public(params.build.public)
    largest = largest_per_source(instructions, params.build.seed)
    sizes = [largest if s == ALL else int(s) for s in args.sizes]
    base = Setting(
        per_source=sizes[0],
        augment_share=args.augment[0],
        position=args.positions[0],
        pooling=args.poolings[0],
        layers="default",
    )
    settings = [base]
    settings += [replace(base, per_source=s) for s in sizes[1:]]
    settings += [replace(base, augment_share=a) for a in args.augment[1:]]
    settings += [replace(base, position=p) for p in args.positions[1:]]
    settings += [replace(base, pooling=p) for p in args.poolings[1:]]
    settings += [replace(base, layers=ALL)]
    # The levers together: the most data, augmentation and both poolings, under each position.
    for position in args.positions:
        settings.append(
            Setting(
                per_source=sizes[-1],
                augment_share=max(args.augment),
                position=position,
                pooling="both",
                layers="default",
            )
        )
    if not args.quick:
        for size in sizes:
            for position in args.positions:
                settings.append(
                    Setting(
                        per_source=size,
                        augment_share=max(args.augment),
                        position=position,
                        pooling="both",
                        layers=ALL,
                    )
                )
    settings = list(dict.fromkeys(settings))

    adapter = load_adapter(params.model)
    everyday = read_everyday(args.everyday, SANITY_RENDER)
    default_layers = tuple(params.extract.resolved_layers(adapter.info.num_layers))
    union_layers = tuple(range(adapter.info.num_layers))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        indexes: dict[tuple[int, float], pl.DataFrame] = {}
        for per_source, share in dict.fromkeys((s.per_source, s.augment_share) for s in settings):
            folder = Path(tmp) / f"n{per_source}-a{share:g}"
            sources = setting_sources(params, instructions, int(per_source), share, folder / "sources")
            indexes[(int(per_source), share)] = build_index(sources, folder / "prepared", params.prepare, params.limits)
        timings: dict[str, float] = {}
        for position in dict.fromkeys(s.position for s in settings):
            prompts = replace(params.prompts, position=position)
            tick = time.perf_counter()
            keys, union = extract_union(adapter, list(indexes.values()), prompts, union_layers, args.batch_size)
            timings[f"extract_{position}_s"] = time.perf_counter() - tick
            for setting in [s for s in settings if s.position == position]:
                index = indexes[(int(setting.per_source), setting.augment_share)]
                data = eval_data(index, keys, union, union_layers, setting, default_layers)
                tick = time.perf_counter()
                summary = score_setting(data, params, args.fusion, args.safety)
                # The setting's best detector and LSI, built as shipped, check the everyday set.
                best = max((d for d in DETECTORS if d in summary), key=lambda d: summary[d]["mean_auroc"])
                checked = {}
                for name in dict.fromkeys([best, LSI]):
                    guard = shipped_guard(adapter, data, name, params, prompts, args.fusion, args.safety)
                    checked[name] = {"tau": guard.tau, **everyday_figures(guard, everyday, params.evaluate.confidence)}
                for detector in [d for d in DETECTORS if d in summary] + ["length_only", "style_only"]:
                    cell = summary[detector]
                    per = cell["per_group"]
                    rows.append(
                        {
                            **asdict(setting),
                            "setting": setting.name,
                            "rows": index.height,
                            "detector": detector,
                            "mean_auroc": cell["mean_auroc"],
                            "min_auroc": cell["min_auroc"],
                            "mean_tpr_at_5pct_fpr": float(np.nanmean([c["tpr_at_5pct_fpr"] for c in per.values()])),
                            "max_fpr_at_tau": cell["max_fpr"],
                            "per_upstream_auroc": {g: c["auroc"] for g, c in per.items()},
                            **checked.get(detector, {}),
                        }
                    )
                print(f"{setting.name}: scored in {time.perf_counter() - tick:.0f} s", flush=True)
    table = pl.DataFrame(rows, infer_schema_length=None).sort("mean_auroc", descending=True)
    with pl.Config(tbl_rows=200, tbl_cols=12, fmt_str_lengths=60, tbl_width_chars=200):
        print(
            table.select(
                "setting",
                "rows",
                "detector",
                "mean_auroc",
                "min_auroc",
                "mean_tpr_at_5pct_fpr",
                "max_fpr_at_tau",
                "everyday_accuracy",
                "everyday_benign_flagged",
                "forged_benign_flagged",
            )
        )
    best = table.row(0, named=True)
    print(
        f"ceiling: {best['setting']} / {best['detector']}: mean AUROC {best['mean_auroc']:.3f}, "
        f"lowest {best['min_auroc']:.3f}"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "model": params.model.path,
                "machine": platform.platform(),
                "largest_per_source": largest,
                "lsi_pair": [args.fusion, args.safety],
                "seconds": time.perf_counter() - started,
                "timings": timings,
                "rows": table.to_dicts(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
