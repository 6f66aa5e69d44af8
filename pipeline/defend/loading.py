"""What a guard is built from: a finished run's params, detector, calibration and model, checked to fit.

A probe trained on another model's states, at layers the model lacks, or under other contrastive
prompts would give meaningless scores, so a guard refuses to be built on one, naming what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import ContrastivePrompts, GuardConfig, ModelConfig, Params, load_params
from pipeline.config.pooling import LAST
from pipeline.defend.load_errors import GuardLoadError
from pipeline.detect.calibration import Calibration, load_calibration
from pipeline.detect.detector import Detector, LSIDetector
from pipeline.detect.probe import LSIProbe, ProbeMeta
from pipeline.detect.shipped import load_detector
from pipeline.layout import CALIBRATION, PARAMS, PROBE_DIR
from pipeline.models.base import ModelAdapter, ModelInfo, ModelLoadError, check_layers
from pipeline.models.registry import load_adapter

# The fields of a probe's store provenance that must match the live model and prompts.
_MATCHED_FIELDS = ("model_name", "model_revision", "template_benign", "template_malicious", "prompt_position")
# Where a mismatched field is set, when it is a params.yaml key.
_PARAMS_KEYS = {
    "template_benign": "prompts.benign",
    "template_malicious": "prompts.malicious",
    "prompt_position": "prompts.position",
}


def probe_mismatches(meta: ProbeMeta, info: ModelInfo, prompts: ContrastivePrompts) -> list[str]:
    """Where the probe's training setup (from its store's provenance) differs from the live one (model ``info``).

    A probe records nothing when trained outside a store (empty provenance): nothing to check.
    A store written before the prompt position was recorded was written under ``before``.
    """
    recorded = dict(meta.store_provenance)
    if recorded:
        recorded.setdefault("prompt_position", "before")
    live = {
        "model_name": info.name,
        "model_revision": info.revision,
        "template_benign": prompts.benign,
        "template_malicious": prompts.malicious,
        "prompt_position": prompts.position,
    }
    return [
        f"{key}: probe has {recorded[key]!r}, live setup has {live[key]!r}"
        + (f" (params.yaml {_PARAMS_KEYS[key]})" if key in _PARAMS_KEYS else "")
        for key in _MATCHED_FIELDS
        if key in recorded and recorded[key] != live[key]
    ]


def checked_detector(
    info: ModelInfo,
    detector: Detector | LSIProbe,
    meta: ProbeMeta,
    tau: float,
    prompts: ContrastivePrompts,
) -> Detector:
    """``detector`` (a bare probe read at ``meta``'s layers) once it is known to fit the live setup.

    ``info`` describes the model: a loaded adapter's, or one read from a model folder's metadata
    (:func:`pipeline.detect.provenance.model_info`) when the weights need not load.

    Raises ``ValueError`` for a tau that is not finite, a probe of another hidden size, layers the
    model lacks, a pooling other than its training store's, or a probe trained under another
    model or prompts (:func:`probe_mismatches`).
    """
    if not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau}")
    # A probe trained on another model's states would give meaningless scores; fail loudly now.
    if meta.hidden_size != info.hidden_size:
        raise ValueError(
            f"probe expects hidden size {meta.hidden_size} but model {info.name!r} has "
            f"{info.hidden_size}; retrain the probe for this model"
        )
    if isinstance(detector, LSIProbe):
        detector = LSIDetector.from_probe(detector, meta.fusion_layer, meta.safety_layer, meta.pooling)
    check_layers(list(detector.layers), info.num_layers)
    # The guard computes the features the detector says it reads; they must be those it was trained on.
    stored = meta.store_provenance.get("pooling", LAST) if meta.store_provenance else meta.pooling
    if not detector.pooling == meta.pooling == stored:
        raise ValueError(
            f"pooling differs: the detector reads {detector.pooling!r}, its metadata says {meta.pooling!r} and "
            f"its training store holds {stored!r}; retrain the detector (dvc repro train)"
        )
    mismatches = probe_mismatches(meta, info, prompts)
    if mismatches:
        raise ValueError("probe was trained under a different setup: " + "; ".join(mismatches))
    return detector


def run_path(run: Path, path: str) -> str:
    """A params path read relative to the run folder, unless it is absolute."""
    return path if Path(path).is_absolute() else str(run / path)


def run_params(run_dir: str | Path) -> Params:
    """The ``params.yaml`` of a run folder; a folder without one raises :class:`GuardLoadError` saying so."""
    path = Path(run_dir) / PARAMS
    if not path.is_file():
        raise GuardLoadError(f"{path}: no params file; --run must be the project folder of a run")
    return load_params(path)


@dataclass(frozen=True, kw_only=True)
class RunPieces:
    """What a finished run holds for a guard besides its params: the detector, its calibration, the model."""

    detector: Detector
    meta: ProbeMeta
    calibration: Calibration
    adapter: ModelAdapter


def load_run_detector(run: Path) -> tuple[Detector, ProbeMeta, Calibration]:
    """The trained detector, its metadata and its calibration in run folder ``run``.

    What is missing raises :class:`GuardLoadError` saying what to run.
    """
    try:
        detector, meta = load_detector(run / PROBE_DIR)
        calibration = load_calibration(run / CALIBRATION)
    except FileNotFoundError as exc:
        raise GuardLoadError(
            f"{exc}. {run} has no finished run: run `bash scripts/run.sh` there (dvc repro) first"
        ) from None
    return detector, meta, calibration


def run_model_config(run: Path, params: Params) -> ModelConfig:
    """The run's ``model`` params section with its relative paths (model folder, OCR cache) read from ``run``."""
    return replace(
        params.model,
        path=run_path(run, params.model.path),
        ocr_cache=run_path(run, params.model.ocr_cache),
    )


def load_run_pieces(run: Path, params: Params, adapter: ModelAdapter | None = None) -> RunPieces:
    """The trained detector, the calibration and the model of the run in folder ``run``, whose params are ``params``.

    Relative paths in the params are read from ``run``; ``adapter`` replaces loading the model.
    What is missing raises :class:`GuardLoadError` saying what to run.
    """
    detector, meta, calibration = load_run_detector(run)
    if adapter is None:
        try:
            adapter = load_adapter(run_model_config(run, params), params.limits.max_request_tokens)
        except (FileNotFoundError, ModelLoadError) as exc:
            raise GuardLoadError(f"cannot load the run's model: {exc}") from None
    return RunPieces(detector=detector, meta=meta, calibration=calibration, adapter=adapter)


def overridden_guard_config(
    config: GuardConfig,
    policy: str | None,
    on_error: str | None,
    ecso_margin: float | None,
    max_new_tokens: int | None,
) -> GuardConfig:
    """``config`` with the given settings replaced (None keeps the saved one); the section's checks apply."""
    overrides = {"policy": policy, "on_error": on_error, "ecso_margin": ecso_margin, "max_new_tokens": max_new_tokens}
    return replace(config, **{key: value for key, value in overrides.items() if value is not None})
