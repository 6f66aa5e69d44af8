"""Where a run's files live, relative to the project (run) folder; ``dvc.yaml`` names the same paths."""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
INDEX = Path("data/prepared/index.parquet")
STORE = Path("data/activations/store.zarr")
PROBE_DIR = Path("data/probe")
CALIBRATION = Path("data/calibration/calibration.json")
