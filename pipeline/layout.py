"""Where a run's files live, relative to the project (run) folder; ``dvc.yaml`` names the same paths.

Every ``data/...`` path the stages, the command line and the benchmark scripts use is defined
here once, so a folder is renamed in one place (and in ``dvc.yaml``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import LSIGuardError

PARAMS = Path("params.yaml")
DATA = Path("data")

# convert_model
MODEL_NOTE = DATA / "model" / "external_model.json"

# build
BUILT_DIR = DATA / "built"
SOURCES_FILE = BUILT_DIR / "sources.json"
BUILT_SUMMARY = BUILT_DIR / "summary.json"

# prepare
INDEX = DATA / "prepared" / "index.parquet"

# extract
STORE = DATA / "activations" / "store.zarr"

# sweep
SWEEP_DIR = DATA / "sweep"
SWEEP = SWEEP_DIR / "sweep.json"
SWEEP_PLOT = SWEEP_DIR / "sweep_plot.json"

# train
PROBE_DIR = DATA / "probe"

# calibrate
CALIBRATION_DIR = DATA / "calibration"
CALIBRATION = CALIBRATION_DIR / "calibration.json"
RELIABILITY = CALIBRATION_DIR / "reliability.json"
RELIABILITY_PNG = CALIBRATION_DIR / "reliability.png"
CALIBRATION_METRICS = CALIBRATION_DIR / "metrics.json"

# export: the guard as one shareable folder (pipeline.defend.bundle)
GUARD_BUNDLE = DATA / "guard_bundle"

# evaluate
EVAL_DIR = DATA / "eval"
EVAL_METRICS = EVAL_DIR / "metrics.json"

# guard, ecso, attribute
GUARD_DIR = DATA / "guard"
ECSO_DIR = DATA / "ecso"
ATTRIBUTION_DIR = DATA / "attribution"

# compare: one folder per suite, and the partial file of a killed run beside it
COMPARE_ROOT = DATA / "compare"
RENDER_ROOT = DATA / "cache" / "render"
PARTIAL_SUFFIX = ".partial.jsonl"

# report
REPORT_ROOT = DATA / "report"

# sanity: a fresh everyday set scored by the run's guard; never a prepare source, so never trained on
SANITY_SET = DATA / "demo" / "everyday.jsonl"
SANITY_DIR = DATA / "sanity"
SANITY_ROWS = SANITY_DIR / "rows.jsonl"
SANITY_METRICS = SANITY_DIR / "metrics.json"
SANITY_RENDER = RENDER_ROOT / "sanity"


class MissingOutput(LSIGuardError, FileNotFoundError):
    """A file an earlier stage writes is not there; the message names it and what writes it."""


def compare_dir(suite: str) -> Path:
    """The comparison outputs of one suite (DVC empties it before the stage runs)."""
    return COMPARE_ROOT / suite


def compare_partial(suite: str) -> Path:
    """Where a comparison run keeps its finished batches, beside the suite's folder so DVC leaves it."""
    return COMPARE_ROOT / f"{suite}{PARTIAL_SUFFIX}"


def require(path: Path, written_by: str) -> Path:
    """``path`` itself when it is a file; otherwise :class:`MissingOutput` naming the command that writes it."""
    if not path.is_file():
        raise MissingOutput(f"{path}: missing; run {written_by}")
    return path
