"""A saved guard: one folder holding the detector, tau, the settings and the model's identity, with a manifest.

The folder (written by :mod:`pipeline.defend.pretrained`)::

    guard.json                  the manifest: format, format version, sha256 of every other file
    detector/probe.safetensors  the detector's weights (no pickle)
    detector/probe.json         the detector's description (ProbeMeta), as a run's data/probe/ holds it
    calibration.json            tau and the calibration summary, as a run's data/calibration/ holds it
    settings.json               tau, and the prompts, guard, ecso and limits sections the guard runs under
    model.json                  the model's identity (kind, name, revision, sizes), dtype, device and folder
    run.json                    the run record of the code, libraries and model that made the guard

Every file the manifest lists is checked against its hash before anything is read, so a file
changed after saving (a flipped byte, an edited setting) is refused by name. The manifest guards
against damage and casual edits, not against someone who rewrites it too: for a bundle from an
untrusted source, pin the Hub revision you reviewed.

This module reads only JSON (no torch): the command line checks a saved guard's limits with it
before the model loads. Resolving a Hugging Face Hub id to a local folder lives here too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.config import ContrastivePrompts, ECSOConfig, GuardConfig, LimitsConfig, ModelConfig, params_from_dict
from pipeline.config.checks import ConfigError
from pipeline.defend.load_errors import GuardLoadError
from pipeline.io import sha256_file

FORMAT = "lsi-guard-bundle"
FORMAT_VERSION = 1
MANIFEST = "guard.json"
DETECTOR_DIR = "detector"
# The detector's own save format (pipeline.detect.shipped) inside DETECTOR_DIR; its file names are
# pipeline.detect.probe's WEIGHTS_FILE and META_FILE (a test keeps them equal).
DETECTOR_WEIGHTS = f"{DETECTOR_DIR}/probe.safetensors"
DETECTOR_META = f"{DETECTOR_DIR}/probe.json"
CALIBRATION_FILE = "calibration.json"
SETTINGS_FILE = "settings.json"
MODEL_FILE = "model.json"
RUN_FILE = "run.json"
# What every bundle holds; calibration.json is there when the guard was calibrated (always, from a run).
REQUIRED_FILES: tuple[str, ...] = (DETECTOR_WEIGHTS, DETECTOR_META, SETTINGS_FILE, MODEL_FILE, RUN_FILE)
SETTINGS_SECTIONS: tuple[str, ...] = ("prompts", "guard", "ecso", "limits")
# model.json's keys: its text fields, then its sizes.
MODEL_TEXTS: tuple[str, ...] = ("kind", "name", "revision", "path", "dtype", "device")
MODEL_SIZES: tuple[str, ...] = ("num_layers", "hidden_size")


class GuardBundleError(GuardLoadError):
    """A saved guard that cannot be read: no manifest, an unknown format version, a missing or malformed file."""


class BundleHashMismatch(GuardBundleError):
    """A file of a saved guard that differs from the hash its manifest records (changed after saving)."""


class ModelIdentityError(GuardLoadError):
    """A model other than the one a saved guard was trained on (kind, name or revision differ)."""


@dataclass(frozen=True, kw_only=True)
class BundleSettings:
    """What ``settings.json`` holds: tau and the params sections the guard runs under."""

    tau: float
    prompts: ContrastivePrompts
    guard: GuardConfig
    ecso: ECSOConfig
    limits: LimitsConfig

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``settings.json`` (sections as ``params.yaml`` spells them)."""
        return {"tau": self.tau, **{name: asdict(getattr(self, name)) for name in SETTINGS_SECTIONS}}


@dataclass(frozen=True, kw_only=True)
class BundleModel:
    """What ``model.json`` holds: the model's identity, its sizes, and how it was loaded.

    ``path`` is the model folder relative to the bundle folder, so a bundle saved inside a project
    finds the project's model folder wherever the project is cloned; it is empty in a bundle that
    records no folder (one pushed to the Hub), which then needs the model named when loaded.
    """

    kind: str
    name: str
    revision: str
    num_layers: int
    hidden_size: int
    dtype: str
    device: str
    path: str

    def identity(self) -> dict[str, str]:
        """``{"kind": ..., "name": ..., "revision": ...}``: what a model must match to use the bundle."""
        return {"kind": self.kind, "name": self.name, "revision": self.revision}

    def config(self, path: str | Path, ocr_cache: str | Path) -> ModelConfig:
        """The ``model`` params section that loads the model in folder ``path`` as the guard was saved with."""
        return ModelConfig(
            kind=self.kind, path=str(path), ocr_cache=str(ocr_cache), dtype=self.dtype, device=self.device
        )


def relative_to_bundle(path: str | Path, bundle: Path) -> str:
    """``path`` as the bundle at ``bundle`` records it: relative to the bundle folder, with ``/`` separators.

    Relative, so that the bundle names no folder of the machine that saved it and finds the model
    again wherever the project (bundle and model together) is cloned.
    """
    return Path(os.path.relpath(Path(path).absolute(), Path(bundle).absolute())).as_posix()


def identity_differences(recorded: BundleModel, kind: str | None, name: str, revision: str) -> list[str]:
    """How a model (its ``kind``, or None where unknown, ``name`` and ``revision``) differs from the recorded one."""
    live = {"kind": kind, "name": name, "revision": revision}
    return [
        f"model {key}: the guard was trained on {value!r}, the given model has {live[key]!r}"
        for key, value in recorded.identity().items()
        if live[key] is not None and live[key] != value
    ]


# -- manifest ---------------------------------------------------------------------------------


def manifest_for(folder: Path, version: str) -> dict[str, Any]:
    """The manifest of the files under ``folder``: format, version, and each file's sha256 by POSIX path."""
    files = {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "lsi_guard_version": version, "files": files}


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a bundle file; anything else is a :class:`GuardBundleError` naming the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GuardBundleError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GuardBundleError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise GuardBundleError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def verify_bundle(folder: Path) -> dict[str, str]:
    """Check a saved guard's manifest and every file it lists; return the listed files and their hashes.

    Raises :class:`GuardBundleError` for a folder without a manifest, an unknown format or format
    version, a manifest that lacks a required file or names one outside the folder, or a listed
    file that is missing; :class:`BundleHashMismatch` for a file whose content differs from its hash.
    Files the manifest does not list (a Hub repository's ``.gitattributes``) are never read.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise GuardBundleError(
            f"{folder}: no {MANIFEST}, so not a saved guard; save one with Guard.save_pretrained or `lsi-guard export`"
        )
    manifest = read_json_object(path)
    if manifest.get("format") != FORMAT:
        raise GuardBundleError(f"{path}: 'format' must be {FORMAT!r}, got {manifest.get('format')!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise GuardBundleError(
            f"{path}: format_version {version!r} is not one this lsi-guard reads (it reads {FORMAT_VERSION}); "
            "load the bundle with the lsi-guard version that saved it, or save it again with this one"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise GuardBundleError(f"{path}: 'files' must map each file's path to its sha256")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise GuardBundleError(f"{path}: lists no {', '.join(missing)}; every saved guard holds them")
    for name, expected in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or name in ("", MANIFEST):
            raise GuardBundleError(f"{path}: {name!r} is not a file inside the bundle")
        file = folder / relative
        if not file.is_file():
            raise GuardBundleError(f"{file}: missing, though {MANIFEST} lists it; fetch the whole bundle again")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleHashMismatch(
                f"{file}: its sha256 {actual[:16]}... differs from {expected[:16]}... in {MANIFEST}: the file was "
                "changed after the guard was saved; fetch the bundle again or save it anew"
            )
    return dict(files)


# -- settings and model -------------------------------------------------------------------------


def read_settings(folder: Path) -> BundleSettings:
    """``settings.json`` of a verified bundle, each section validated as ``params.yaml``'s is."""
    path = folder / SETTINGS_FILE
    raw = read_json_object(path)
    expected = {"tau", *SETTINGS_SECTIONS}
    if set(raw) != expected:
        raise GuardBundleError(
            f"{path}: expected keys {sorted(expected)}, got {sorted(raw)}; it was written by another version"
        )
    tau = raw["tau"]
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not math.isfinite(tau):
        raise GuardBundleError(f"{path}: 'tau' must be a finite number, got {tau!r}")
    try:
        params = params_from_dict({name: raw[name] for name in SETTINGS_SECTIONS})
    except ConfigError as exc:
        raise GuardBundleError(f"{path}: {exc}") from None
    return BundleSettings(
        tau=float(tau), prompts=params.prompts, guard=params.guard, ecso=params.ecso, limits=params.limits
    )


def read_model(folder: Path) -> BundleModel:
    """``model.json`` of a verified bundle; a missing or mistyped key is named."""
    path = folder / MODEL_FILE
    raw = read_json_object(path)
    for key in MODEL_TEXTS:
        if not isinstance(raw.get(key), str):
            raise GuardBundleError(f"{path}: {key!r} must be text, got {raw.get(key)!r}")
    for key in MODEL_SIZES:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GuardBundleError(f"{path}: {key!r} must be a whole number >= 1, got {value!r}")
    model = BundleModel(**{key: raw[key] for key in (*MODEL_TEXTS, *MODEL_SIZES)})
    try:
        model.config(folder, folder)  # the params checks: a known kind, dtype and device
    except ConfigError as exc:
        raise GuardBundleError(f"{path}: {exc}") from None
    return model


# -- where a bundle is ----------------------------------------------------------------------------


def resolve_source(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder of a saved guard: ``source`` itself when it is a folder, else a Hugging Face Hub download.

    A Hub id (``owner/name``) is fetched with ``huggingface_hub.snapshot_download`` at ``revision``
    (a branch, tag or commit; default ``main``) into the Hub cache (``cache_dir``, default
    ``HF_HUB_CACHE``). Under ``HF_HUB_OFFLINE=1`` only a bundle already in the cache resolves.
    What cannot be found either way raises :class:`GuardBundleError` saying both.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise GuardBundleError(f"{source}: is a file; give the folder of a saved guard (the one holding {MANIFEST})")
    # Imported on first use: only a Hub id needs it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = snapshot_download(str(source), revision=revision, cache_dir=cache_dir, token=token)
    except HFValidationError:
        raise GuardBundleError(f"{source}: no such folder, and not a Hugging Face Hub repository id") from None
    except Exception as exc:  # noqa: BLE001 - the Hub's errors (network, 404, offline cache miss) all mean "not found"
        raise GuardBundleError(
            f"{source}: no such folder here, and the Hugging Face Hub could not provide it "
            f"({type(exc).__name__}: {exc}); with HF_HUB_OFFLINE=1 only a bundle already in the cache is found"
        ) from None
    return Path(str(folder))


def bundle_limits_and_policy(source: str | Path) -> tuple[Path, LimitsConfig, str]:
    """A saved guard's folder (:func:`resolve_source`), its limits and its policy, after checking every file.

    For callers that check requests against the limits before the model loads (the command line).
    """
    folder = resolve_source(source)
    verify_bundle(folder)
    settings = read_settings(folder)
    return folder, settings.limits, settings.guard.policy
