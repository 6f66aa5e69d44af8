"""The whole of ``params.yaml``: reading it (YAML 1.2) and validating every section at once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.config.checks import ConfigError, from_raw, refuse
from pipeline.config.compare import CompareConfig, compare_from_raw
from pipeline.config.prompts import ContrastivePrompts, Decoding
from pipeline.config.sections import (
    LAYER_CHOICE,
    AttributeConfig,
    BuildConfig,
    CalibrateConfig,
    ClusterConfig,
    ECSOConfig,
    EvaluateConfig,
    ExtractConfig,
    GuardConfig,
    LimitsConfig,
    ModelConfig,
    PrepareConfig,
    TrainConfig,
)


@dataclass(frozen=True, kw_only=True)
class Params:
    """The whole of ``params.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: ContrastivePrompts = field(default_factory=ContrastivePrompts)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    ecso: ECSOConfig = field(default_factory=ECSOConfig)
    attribute: AttributeConfig = field(default_factory=AttributeConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        for key, layer in (("fusion_layer", self.train.fusion_layer), ("safety_layer", self.train.safety_layer)):
            if layer != LAYER_CHOICE and not self.extract.holds(layer):
                raise ConfigError(
                    f"train.{key}={layer} is not among extract.layers={list(self.extract.layers)}; "
                    "add it there (this reruns extract) or pick a stored layer"
                )
        missing = [layer for layer in self.evaluate.refusal_layers if not self.extract.holds(layer)]
        if missing:
            raise ConfigError(
                f"evaluate.refusal_layers {missing} are not among extract.layers={list(self.extract.layers)}"
            )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "prompts": ContrastivePrompts,
    "prepare": PrepareConfig,
    "extract": ExtractConfig,
    "train": TrainConfig,
    "calibrate": CalibrateConfig,
    "evaluate": EvaluateConfig,
    "build": BuildConfig,
    "guard": GuardConfig,
    "ecso": ECSOConfig,
    "attribute": AttributeConfig,
    "compare": CompareConfig,
    "limits": LimitsConfig,
    "cluster": ClusterConfig,
}


def _prepare(raw: Any) -> PrepareConfig:
    """``prepare``, whose ``splits`` mapping is stored as ``split_fractions`` pairs."""
    section = dict(_mapping("prepare", raw))
    if "split_fractions" in section:  # the stored name is not a params.yaml key
        raise ConfigError("unknown key(s) ['split_fractions'] in params section 'prepare'; write it as splits")
    if "splits" in section:
        splits = _mapping("prepare.splits", section.pop("splits"))
        section["split_fractions"] = tuple((str(name), fraction) for name, fraction in splits.items())
    return from_raw(PrepareConfig, "prepare", section)


def _ecso(raw: Any) -> ECSOConfig:
    """``ecso``, with its nested ``decoding`` section."""
    section = dict(_mapping("ecso", raw))
    if "decoding" in section:
        section["decoding"] = from_raw(Decoding, "ecso.decoding", section["decoding"])
    return from_raw(ECSOConfig, "ecso", section)


def _mapping(where: str, raw: Any) -> Mapping[str, Any]:
    """A section's mapping; an empty section (``train:`` alone) means all defaults."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        refuse(where, "a mapping of settings", raw)
    return raw


def params_from_dict(raw: Mapping[str, Any]) -> Params:
    """Validate a parsed ``params.yaml`` into :class:`Params`."""
    if not isinstance(raw, Mapping):
        refuse("params", "a mapping of sections", raw)
    unknown = sorted(str(name) for name in set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown params section(s) {unknown}; known: {sorted(SECTIONS)}")
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        section = raw.get(name)
        if name == "prepare":
            built[name] = _prepare(section)
        elif name == "ecso":
            built[name] = _ecso(section)
        elif name == "compare":
            built[name] = compare_from_raw(section)
        else:
            built[name] = from_raw(cls, name, section)
    return Params(**built)


def read_yaml(path: Path) -> Any:
    """Parse ``path`` as YAML 1.2, as DVC reads it: ``5e-4`` and ``.5`` are numbers, ``yes`` is text.

    Duplicate keys are refused (YAML 1.1 readers keep the last one silently).
    """
    try:
        return YAML(typ="safe", pure=True).load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file") from None
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; errors name the file, then ``section.key``."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        return params_from_dict(raw if raw is not None else {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
