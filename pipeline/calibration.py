"""Choose the refusal threshold tau on a calibration split, and persist it as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """Refuse when ``score > tau``; tau was chosen for ``target_fpr`` on the calibration split."""

    tau: float
    target_fpr: float
    calib_fpr: float
    calib_tpr: float
    n_benign: int
    n_harmful: int


def choose_tau(labels: np.ndarray, scores: np.ndarray, target_fpr: float) -> Calibration:
    """The lowest tau whose false-positive rate on benign calibration rows is at most ``target_fpr``.

    The lowest such tau refuses the most harmful requests for the allowed false positives.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    benign, harmful = scores[labels == 0], scores[labels == 1]
    if len(benign) == 0 or len(harmful) == 0:
        raise ValueError(f"calibration needs both labels, got {len(benign)} benign and {len(harmful)} harmful rows")
    allowed = int(np.floor(target_fpr * len(benign)))  # benign rows that may score above tau
    descending = np.sort(benign)[::-1]
    tau = float(descending[allowed]) if allowed < len(benign) else float(descending[-1]) - 1e-12
    return Calibration(
        tau=tau,
        target_fpr=target_fpr,
        calib_fpr=float(np.mean(benign > tau)),
        calib_tpr=float(np.mean(harmful > tau)),
        n_benign=int(len(benign)),
        n_harmful=int(len(harmful)),
    )


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Write the calibration as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(calibration), indent=2))


def load_calibration(path: Path) -> Calibration:
    """Read a calibration written by :func:`save_calibration`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no calibration; run the 'calibrate' stage (dvc repro calibrate)")
    return Calibration(**json.loads(Path(path).read_text()))
