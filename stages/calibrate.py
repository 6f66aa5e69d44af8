"""DVC stage ``calibrate``: the shipped detector's scaling and tau from the calibration split, and reliability.

Writes ``data/calibration/calibration.json`` (what the guard reads), ``reliability.json`` and ``.png``, and
``metrics.json`` (the same calibration with the detector and the run record, for ``dvc metrics``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from pipeline.config import CalibrateConfig, load_params
from pipeline.data.index import read_index
from pipeline.detect.calibration import Calibration, calibrate, reliability_rows, save_calibration
from pipeline.detect.heldout import held_out_scores, load_eval_data
from pipeline.detect.provenance import open_store
from pipeline.detect.shipped import load_detector
from pipeline.evaluate.plots import plot_reliability
from pipeline.io import replace_dir_atomic, write_json_atomic
from pipeline.layout import CALIBRATION, CALIBRATION_METRICS, INDEX, PROBE_DIR, RELIABILITY, RELIABILITY_PNG, STORE
from stages import run_record, run_stage

logger = logging.getLogger(__name__)

OUT = CALIBRATION


def write_calibration(
    labels: np.ndarray, raw_scores: np.ndarray, config: CalibrateConfig, out_dir: Path
) -> Calibration:
    """Calibrate, then write ``calibration.json``, ``reliability.json`` and ``reliability.png`` under ``out_dir``.

    ``reliability.json`` holds one row per non-empty bin with a ``scaling`` field: ``raw`` always, and
    the fitted scaling's name as well when there is one.
    """
    calibration = calibrate(labels, raw_scores, config)
    curves = {"raw": reliability_rows(labels, raw_scores, config.bins)}
    if calibration.scaling.kind != "none":
        curves[calibration.scaling.kind] = reliability_rows(labels, calibration.probability(raw_scores), config.bins)
    save_calibration(calibration, out_dir / OUT.name)
    write_json_atomic(
        out_dir / RELIABILITY.name, [{"scaling": name, **row} for name, rows in curves.items() for row in rows]
    )
    plot_reliability(curves, out_dir / RELIABILITY_PNG.name, f"Calibration split reliability (n={len(labels)})")
    return calibration


def summary_line(calibration: Calibration) -> str:
    """One line with tau, how it was chosen, its rates on the calibration split, and the ECE raw and scaled."""
    scaled = (
        "" if calibration.scaling.kind == "none" else f", {calibration.scaling.kind} {_number(calibration.ece_scaled)}"
    )
    return (
        f"tau={calibration.tau:.4f} ({calibration.method}): calibration FPR {calibration.calib_fpr:.3f}, "
        f"TPR {calibration.calib_tpr:.3f}, F1 {_number(calibration.calib_f1)}; ECE raw {_number(calibration.ece_raw)}"
        + scaled
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main() -> None:
    """Score the calibration split with the shipped detector (held out by ``train.held_out_by``, or in-source);
    calibrate; write."""
    params = load_params()
    detector, meta = load_detector(PROBE_DIR)
    index = read_index(INDEX)
    store = open_store(params, STORE)
    data = load_eval_data(index, store)
    rows = np.flatnonzero(index["split"].to_numpy() == "calib")
    if params.calibrate.held_out:
        # Each calibration row scored by a detector of the same kind fitted without its upstream (train.held_out_by).
        config = replace(params.train, fusion_layer=meta.fusion_layer, safety_layer=meta.safety_layer)
        scores = held_out_scores(data, rows, meta.detector, config, meta.fusion_layer, meta.safety_layer)
        logger.info(
            "tau from held-out-%s %s scores of %d calibration rows", config.held_out_by, meta.detector, len(rows)
        )
    else:
        scores = data.scores(detector, rows)
    # Built beside data/calibration and swapped in whole (persist: true in dvc.yaml).
    with replace_dir_atomic(OUT.parent) as out:
        calibration = write_calibration(data.labels[rows], scores, params.calibrate, out)
        # Apart from calibration.json, which later stages depend on: a new run record alone reruns nothing.
        run = run_record(store.provenance.model_name, store.provenance.model_revision, "cpu")
        metrics = {**asdict(calibration), "detector": detector.describe(), "run": run}
        write_json_atomic(out / CALIBRATION_METRICS.name, metrics)
    print(f"{detector.describe()}: {summary_line(calibration)}")


if __name__ == "__main__":
    run_stage(main)
