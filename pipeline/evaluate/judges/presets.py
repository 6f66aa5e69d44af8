"""The judge presets by name (``compare.judge.preset``), and the one a judge uses."""

from __future__ import annotations

from pipeline.evaluate.judges.base import JudgeError
from pipeline.evaluate.judges.harmbench import HARMBENCH
from pipeline.evaluate.judges.llama_guard import LLAMA_GUARD, LLAMA_GUARD_VISION
from pipeline.evaluate.judges.preset import Preset, question_preset
from pipeline.evaluate.judges.strongreject import STRONGREJECT

# The standard judges; "" (the plain question) is built from the configured prompt instead. Their
# names must be pipeline.config.JUDGE_PRESETS, which params.yaml is checked against (tested).
PRESETS: dict[str, Preset] = {
    preset.name: preset for preset in (HARMBENCH, LLAMA_GUARD, LLAMA_GUARD_VISION, STRONGREJECT)
}


def resolve_preset(name: str, prompt: str) -> Preset:
    """The preset called ``name``; the plain question with ``prompt`` for ``""``."""
    if not name:
        return question_preset(prompt)
    if name not in PRESETS:
        raise JudgeError(f"unknown judge preset {name!r}; choose from {sorted(PRESETS)} or '' (the plain question)")
    return PRESETS[name]
