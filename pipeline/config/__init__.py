"""Typed configuration: each ``params.yaml`` section maps to a frozen dataclass.

Validation happens once, here, at the edge; the library takes these objects, never dicts.
``checks`` holds the field checks and the one error shape, ``prompts``, ``sections`` and
``compare`` the sections, ``loading`` the whole file (read as YAML 1.2).
"""

from pipeline.config.checks import ConfigError
from pipeline.config.compare import (
    COMPARE_DEFENCES,
    HTTP_ONLY_PRESETS,
    JUDGE_KINDS,
    JUDGE_PRESETS,
    BenchmarkSpec,
    CompareConfig,
    JudgeConfig,
)
from pipeline.config.loading import Params, load_params, params_from_dict
from pipeline.config.pooling import POOLINGS, pooled_variants, pooling_reads
from pipeline.config.prompts import GREEDY, PLACEHOLDER, VARIANTS, ContrastivePrompts, Decoding
from pipeline.config.sections import (
    ALL_LAYERS,
    ATTRIBUTE_TARGETS,
    AUGMENT_FAMILIES,
    DEFAULT_LIMITS,
    GUARD_POLICIES,
    HELD_OUT_BY,
    LABELS,
    LAYER_CHOICE,
    SPLITS,
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

__all__ = [
    "ALL_LAYERS",
    "ATTRIBUTE_TARGETS",
    "AUGMENT_FAMILIES",
    "DEFAULT_LIMITS",
    "COMPARE_DEFENCES",
    "GREEDY",
    "GUARD_POLICIES",
    "HELD_OUT_BY",
    "HTTP_ONLY_PRESETS",
    "JUDGE_KINDS",
    "JUDGE_PRESETS",
    "LABELS",
    "LAYER_CHOICE",
    "PLACEHOLDER",
    "POOLINGS",
    "SPLITS",
    "VARIANTS",
    "AttributeConfig",
    "BenchmarkSpec",
    "BuildConfig",
    "CalibrateConfig",
    "ClusterConfig",
    "CompareConfig",
    "ConfigError",
    "ContrastivePrompts",
    "Decoding",
    "ECSOConfig",
    "EvaluateConfig",
    "ExtractConfig",
    "GuardConfig",
    "JudgeConfig",
    "LimitsConfig",
    "ModelConfig",
    "Params",
    "PrepareConfig",
    "TrainConfig",
    "load_params",
    "params_from_dict",
    "pooled_variants",
    "pooling_reads",
]
