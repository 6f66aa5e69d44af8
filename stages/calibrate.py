"""DVC stage ``calibrate``: choose tau for the target false-positive rate on the calibration split."""

from __future__ import annotations

from pathlib import Path

from pipeline.calibration import choose_tau, save_calibration
from pipeline.config import load_params
from pipeline.features import aligned_features
from pipeline.probe import load_probe
from pipeline.store import ActivationStore
from stages.common import INDEX, PROBE_DIR, STORE, run_stage

OUT = Path("data/calibration/calibration.json")


def main() -> None:
    """Score the calibration split and pick tau."""
    from pipeline.dataset import read_index

    params = load_params()
    probe, meta = load_probe(PROBE_DIR)
    index = read_index(INDEX)
    part = index.filter(index["split"] == "calib")
    features = aligned_features(
        ActivationStore.open(STORE), part["row_id"].to_numpy(), meta.fusion_layer, meta.safety_layer
    )
    calibration = choose_tau(part["label"].to_numpy(), probe.score(features), params.calibrate.target_fpr)
    save_calibration(calibration, OUT)
    print(f"tau={calibration.tau:.4f}: calibration FPR {calibration.calib_fpr:.3f}, TPR {calibration.calib_tpr:.3f}")


if __name__ == "__main__":
    run_stage(main)
