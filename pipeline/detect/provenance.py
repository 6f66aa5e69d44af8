"""The provenance an activation store carries: from a loaded model, or from params.yaml and the model folder.

Extraction records :func:`provenance_for` of the loaded model. Every stage that reads the store
opens it through :func:`open_store`, which compares the store with the provenance ``params.yaml``
and the model folder's metadata say it should have, without loading the weights: a store written
by another model, revision, dtype, template, layer set or pooling is refused by field name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.config import VARIANTS, ContrastivePrompts, ModelConfig, Params, pooled_variants
from pipeline.config.pooling import LAST
from pipeline.detect.store import ActivationStore
from pipeline.detect.store_schema import Provenance
from pipeline.models.base import ModelInfo, ModelLoadError, resolve_device, resolve_dtype_name


def provenance_for(
    info: ModelInfo, prompts: ContrastivePrompts, layers: Sequence[int], pooling: str = LAST
) -> Provenance:
    """The provenance of a store written by the model ``info`` describes, under these prompts, layers and pooling."""
    return Provenance(
        model_name=info.name,
        model_revision=info.revision,
        model_dtype=info.dtype,
        template_benign=prompts.benign,
        template_malicious=prompts.malicious,
        prompt_position=prompts.position,
        pooling=pooling,
        variants=pooled_variants(VARIANTS, pooling),
        layers=tuple(layers),
        hidden_size=info.hidden_size,
    )


def model_info(config: ModelConfig) -> ModelInfo:
    """The :class:`ModelInfo` the adapter for ``config`` reports once loaded, read from the folder's metadata only.

    Name, revision and sizes come from the same files the adapters read them from; the dtype is
    resolved from ``config.dtype`` and ``config.device`` the same way (``auto``: float16 on a GPU).
    """
    dtype = resolve_dtype_name(config.dtype, resolve_device(config.device))
    if config.kind == "embedded":
        return _embedded_info(Path(config.path), dtype)
    return _hf_info(Path(config.path).expanduser(), dtype)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a :class:`ModelLoadError` naming the file and what it is for."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path}: missing; it is needed to check the activation store's {what}. Run the 'convert_model'"
            " stage (dvc repro convert_model) or point params.yaml model.path at the model folder"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _field(raw: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ModelLoadError(f"{path}: key {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _embedded_info(folder: Path, dtype: str) -> ModelInfo:
    """What :meth:`EmbeddedAdapter.from_folder` reports: name and digest from its metadata, sizes from config.json."""
    from pipeline.models.embedded import PROVENANCE_FILE  # the adapter's module brings transformers: only when needed

    meta_path, config_path = folder / PROVENANCE_FILE, folder / "config.json"
    inside = sorted(folder.glob(f"*/{PROVENANCE_FILE}")) if not meta_path.exists() else []
    if inside:
        # The folder above the model's (data/model rather than data/model/smollm2-135m): a common slip.
        raise ModelLoadError(
            f"{folder}: not a converted model folder ({PROVENANCE_FILE} is missing); "
            f"the model is in {inside[0].parent}: name that folder"
        )
    meta, config = _read_json(meta_path, "model name and revision"), _read_json(config_path, "hidden size")
    return ModelInfo(
        name=_field(meta, "name", str, meta_path),
        revision=_field(meta, "source_sha256", str, meta_path)[:16],
        num_layers=_field(config, "num_hidden_layers", int, config_path),
        hidden_size=_field(config, "hidden_size", int, config_path),
        dtype=dtype,
    )


def _hf_info(folder: Path, dtype: str) -> ModelInfo:
    """What :meth:`HFVisionLanguageAdapter.from_folder` reports, from config.json and the folder's fingerprint."""
    from transformers import AutoConfig

    from pipeline.models.hf_vlm import check_supported, model_revision, read_model_config

    raw = read_model_config(folder)
    check_supported(raw, folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'}: transformers cannot read it ({exc})") from None
    # The language model's config, nested as ``text_config`` in multimodal configs (as the adapter reads it).
    text = config.get_text_config() if hasattr(config, "get_text_config") else config.text_config
    return ModelInfo(
        name=folder.resolve().name or str(raw.get("_name_or_path", folder)),
        revision=model_revision(folder),
        num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size),
        dtype=dtype,
    )


def expected_provenance(params: Params) -> Provenance:
    """The provenance the store of a run with these params has: model folder metadata, prompts, ``extract``'s
    layers (``all``: every block the model folder's config counts) and pooling."""
    info = model_info(params.model)
    layers = params.extract.resolved_layers(info.num_layers)
    return provenance_for(info, params.prompts, layers, params.extract.pooling)


def open_store(params: Params, path: Path) -> ActivationStore:
    """Open a finished store for reading, refusing one whose provenance differs from :func:`expected_provenance`.

    Under ``model.dtype: auto`` the store's own dtype is accepted: auto means float16 on a GPU and
    float32 on a CPU, and a store extracted on a team's GPU is meant to train on anyone's CPU.
    """
    expected = expected_provenance(params)
    if params.model.dtype == "auto":
        store = ActivationStore.open(path)
        expected = replace(expected, model_dtype=store.provenance.model_dtype)
    return ActivationStore.open(path, expected=expected)
