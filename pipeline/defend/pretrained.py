"""Saving a guard as one folder (:mod:`pipeline.defend.bundle` describes it), reading it back, and the Hub.

:func:`write_bundle` writes the folder whole or not at all: into a hidden folder beside the target,
swapped in once complete (:func:`pipeline.io.replace_dir_atomic`). :func:`read_bundle` checks
every file against the manifest before reading any; :func:`bundle_adapter` then loads the model
the caller names and refuses one whose kind, name or revision differs from the recorded one,
reading only the model folder's metadata before any weights load. :func:`bundle_from_run` builds
the folder's contents from a finished run without loading the model (``lsi-guard export`` and the
``export`` stage).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from pipeline.config import ModelConfig
from pipeline.defend.bundle import (
    CALIBRATION_FILE,
    DETECTOR_DIR,
    MANIFEST,
    MODEL_FILE,
    RUN_FILE,
    SETTINGS_FILE,
    BundleModel,
    BundleSettings,
    GuardBundleError,
    ModelIdentityError,
    identity_differences,
    manifest_for,
    read_json_object,
    read_model,
    read_settings,
    relative_to_bundle,
    verify_bundle,
)
from pipeline.defend.load_errors import GuardLoadError
from pipeline.defend.loading import checked_detector, load_run_detector, run_model_config, run_params
from pipeline.detect.calibration import Calibration, CalibrationError, load_calibration, save_calibration
from pipeline.detect.detector import Detector
from pipeline.detect.probe import ProbeMeta
from pipeline.detect.provenance import model_info
from pipeline.detect.shipped import load_detector, save_detector
from pipeline.errors import LSIGuardError
from pipeline.io import replace_dir_atomic, write_json_atomic
from pipeline.models.base import ModelAdapter, ModelInfo, ModelLoadError
from pipeline.models.registry import load_adapter
from pipeline.run_record import build_run_record
from pipeline.version import __version__

DEFAULT_COMMIT_MESSAGE = "Upload an LSI-Guard guard"


class BundleWriteError(LSIGuardError, ValueError):
    """A guard that cannot be saved where or as asked (a folder that is not a saved guard, no model settings)."""


@dataclass(frozen=True, kw_only=True)
class BundleContents:
    """Everything a saved guard holds, before it is written.

    ``model`` is the model params section it was loaded with (its ``path`` as this process reads
    it; empty when unknown); ``info`` the model's identity and sizes. ``record_model_path`` False
    records no model folder (a bundle for others, such as one pushed to the Hub).
    """

    detector: Detector
    meta: ProbeMeta
    calibration: Calibration | None
    settings: BundleSettings
    model: ModelConfig
    info: ModelInfo
    run: Mapping[str, Any]
    record_model_path: bool = True


@dataclass(frozen=True, kw_only=True)
class LoadedBundle:
    """A saved guard as read from ``folder``, every file checked against the manifest."""

    folder: Path
    detector: Detector
    meta: ProbeMeta
    calibration: Calibration | None
    settings: BundleSettings
    model: BundleModel
    run: dict[str, Any]


def default_run_record(info: ModelInfo, root: str | Path = ".") -> dict[str, Any]:
    """The run record of saving a guard outside a stage: this checkout's code and libraries, the model, no wall time."""
    # Saving runs no model work; the detector's tensors are written from the CPU.
    return build_run_record(
        model_name=info.name, model_revision=info.revision, device="cpu", wall_time_s=0.0, root=root
    )


def guard_contents(
    *,
    detector: Detector,
    meta: ProbeMeta,
    calibration: Calibration | None,
    settings: BundleSettings,
    model: ModelConfig | None,
    info: ModelInfo,
    run: Mapping[str, Any] | None,
    root: str | Path = ".",
) -> BundleContents:
    """What a guard saves: its parts, the model params section it runs (refused when unknown), and
    ``run`` or, without one, :func:`default_run_record` of the checkout at ``root``."""
    if model is None:
        raise BundleWriteError(
            "this guard does not know the model's kind and folder (it was not loaded by from_run or "
            "from_pretrained); pass model=ModelConfig(kind=..., path=...) describing its adapter"
        )
    return BundleContents(
        detector=detector,
        meta=meta,
        calibration=calibration,
        settings=settings,
        model=model,
        info=info,
        run=run if run is not None else default_run_record(info, root),
    )


def write_bundle(contents: BundleContents, directory: str | Path) -> Path:
    """Write ``contents`` as a saved guard in ``directory``, whole or not at all; return the folder.

    An existing saved guard there is replaced; any other existing, non-empty folder (or a file) is
    refused with :class:`BundleWriteError`, so a mistyped path never wipes a project folder.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise BundleWriteError(f"{target}: is a file; give a folder for the saved guard")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise BundleWriteError(
            f"{target}: a folder that holds other files and no {MANIFEST}; save the guard to a new or empty folder"
        )
    info, config = contents.info, contents.model
    model = BundleModel(
        kind=config.kind,
        name=info.name,
        revision=info.revision,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        dtype=config.dtype,
        device=config.device,
        path=relative_to_bundle(config.path, target) if contents.record_model_path and config.path else "",
    )
    with replace_dir_atomic(target) as new:
        save_detector(contents.detector, contents.meta, new / DETECTOR_DIR)
        if contents.calibration is not None:
            save_calibration(contents.calibration, new / CALIBRATION_FILE)
        write_json_atomic(new / SETTINGS_FILE, contents.settings.to_json())
        write_json_atomic(new / MODEL_FILE, asdict(model))
        write_json_atomic(new / RUN_FILE, dict(contents.run))
        # Last, over every file written above.
        write_json_atomic(new / MANIFEST, manifest_for(new, __version__))
    return target


def read_bundle(folder: str | Path) -> LoadedBundle:
    """The saved guard in local ``folder``, every file checked against its manifest first (:func:`verify_bundle`).

    A bad file raises :class:`~pipeline.defend.bundle.GuardBundleError` naming it.
    """
    folder = Path(folder)
    files = verify_bundle(folder)
    try:
        detector, meta = load_detector(folder / DETECTOR_DIR)
        calibration = load_calibration(folder / CALIBRATION_FILE) if CALIBRATION_FILE in files else None
    except (ValueError, OSError, CalibrationError) as exc:
        raise GuardBundleError(f"{folder}: {exc}") from None
    return LoadedBundle(
        folder=folder,
        detector=detector,
        meta=meta,
        calibration=calibration,
        settings=read_settings(folder),
        model=read_model(folder),
        run=read_json_object(folder / RUN_FILE),
    )


def bundle_from_run(run_dir: str | Path = ".", run: Mapping[str, Any] | None = None) -> BundleContents:
    """A saved guard's contents from a finished run, checked to fit its model, without loading the model's weights.

    The model's identity and sizes come from its folder's metadata
    (:func:`pipeline.detect.provenance.model_info`). ``run`` is the run record to keep (a stage's
    own); None records :func:`default_run_record` of the run folder's checkout.
    """
    folder = Path(run_dir)
    params = run_params(folder)
    detector, meta, calibration = load_run_detector(folder)
    config = run_model_config(folder, params)
    try:
        info = model_info(config)
    except (ModelLoadError, FileNotFoundError) as exc:
        raise GuardLoadError(f"cannot read the run's model: {exc}") from None
    try:
        detector = checked_detector(info, detector, meta, calibration.tau, params.prompts)
    except ValueError as exc:
        raise GuardLoadError(f"{folder}: the run's detector does not fit its model: {exc}") from None
    settings = BundleSettings(
        tau=calibration.tau, prompts=params.prompts, guard=params.guard, ecso=params.ecso, limits=params.limits
    )
    return guard_contents(
        detector=detector,
        meta=meta,
        calibration=calibration,
        settings=settings,
        model=config,
        info=info,
        run=run,
        root=folder,
    )


ModelChoice = str | Path | ModelConfig | ModelAdapter | None


def default_ocr_cache() -> Path:
    """Where a saved guard's embedded model keeps OCR results unless told: a per-user cache beside the Hub's."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "lsi-guard" / "ocr"


def bundle_adapter(
    bundle: LoadedBundle, model: ModelChoice, ocr_cache: str | Path | None = None
) -> tuple[ModelAdapter, ModelConfig]:
    """The model a saved guard runs on, once it is known to be the one the guard was trained on.

    ``model``: None, the folder the bundle records (relative to the bundle folder); a folder path,
    loaded with the recorded kind, dtype and device; a :class:`ModelConfig`, loaded as it says; or
    a loaded adapter, used as it is (it does not say its kind, so only name and revision are
    compared). ``ocr_cache`` is where the embedded model keeps OCR results (default
    :func:`default_ocr_cache`; a ModelConfig's own is kept). Returns the adapter and the params
    section that describes it. A model whose kind, name or revision differs raises
    :class:`~pipeline.defend.bundle.ModelIdentityError` naming each difference, before its weights load.
    """
    recorded, where = bundle.model, bundle.folder / MODEL_FILE
    max_tokens = bundle.settings.limits.max_request_tokens
    cache = default_ocr_cache() if ocr_cache is None else Path(ocr_cache)
    if isinstance(model, ModelConfig):
        config = model
    elif isinstance(model, str | Path):
        config = recorded.config(Path(model).expanduser(), cache)
    elif model is None:
        if not recorded.path:
            raise GuardLoadError(
                f"{where}: the saved guard records no model folder; name the model: "
                f"Guard.from_pretrained(..., model=FOLDER) or --model FOLDER (a {recorded.kind} model "
                f"{recorded.name!r}, revision {recorded.revision})"
            )
        path = bundle.folder / recorded.path
        if not path.is_dir():
            raise GuardLoadError(
                f"{where}: the guard's model folder {path} (recorded as {recorded.path!r}, read from the bundle "
                f"folder) is not here; name the model: Guard.from_pretrained(..., model=FOLDER) or --model FOLDER"
            )
        config = recorded.config(path, cache)
    else:
        _check_identity(bundle, None, model.info)
        # The recorded folder stands for the adapter's, so that saving this guard again records the same.
        return model, recorded.config(bundle.folder / recorded.path if recorded.path else "", cache)
    if config.kind != recorded.kind:
        _refuse(where, [f"model kind: the guard was trained on {recorded.kind!r}, the given model is {config.kind!r}"])
    try:
        _check_identity(bundle, config.kind, model_info(config))  # the folder's metadata: no weights load
        adapter = load_adapter(config, max_tokens)
    except (ModelLoadError, FileNotFoundError) as exc:
        raise GuardLoadError(f"cannot load the model in {config.path}: {exc}") from None
    _check_identity(bundle, config.kind, adapter.info)
    return adapter, config


def _check_identity(bundle: LoadedBundle, kind: str | None, info: ModelInfo) -> None:
    differences = identity_differences(bundle.model, kind, info.name, info.revision)
    if differences:
        _refuse(bundle.folder / MODEL_FILE, differences)


def _refuse(where: Path, differences: list[str]) -> NoReturn:
    raise ModelIdentityError(
        f"{where}: not the model this guard was trained on: " + "; ".join(differences) + ". Load the guard with "
        "the model it was saved with; its scores on another model mean nothing"
    )


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str | None,
    private: bool | None,
    revision: str | None,
    commit_message: str | None,
) -> str:
    """Upload a saved guard's folder to Hub repository ``repo_id`` (created if missing); the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        revision=revision,
    )
    return str(getattr(commit, "commit_url", commit))


def save_and_push(contents: BundleContents, repo_id: str, **hub: Any) -> str:
    """Write ``contents`` to a temporary folder (recording no model folder) and :func:`push_folder` it."""
    with tempfile.TemporaryDirectory(prefix="lsi-guard-push-") as scratch:
        folder = write_bundle(replace(contents, record_model_path=False), Path(scratch) / "guard")
        return push_folder(folder, repo_id, **hub)
