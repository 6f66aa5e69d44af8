"""Loaders that turn public safety benchmarks into one schema, :class:`EvalExample`.

Each loader reads one benchmark's own file format, validates every record and returns
``list[EvalExample]``. Errors are :class:`LoaderError` and name the file and the record
(``file:line`` for CSV and JSON lines, ``file[id]`` for JSON) and what is wrong.

Supported formats (see each loader for details): MM-SafetyBench (TEXT/TYPO/SD/SD_TYPO),
FigStep SafeBench, VLSafe, MM-Vet, XSTest v2, JailBreakV-28K, the alpaca seed tasks, a generic
CSV/JSONL/Parquet table, one split of this pipeline's own prepared index, and a dataset from the
Hugging Face Hub or its local cache (``hf``, by column mapping).
``load_benchmark(kind, **kwargs)`` dispatches by name through :data:`LOADERS`;
:func:`sample_examples` draws a deterministic subset balanced over labels and categories.

The parts: :mod:`~pipeline.data.benchmarks.schema` (the schema, its error and record checks),
:mod:`~pipeline.data.benchmarks.readers` (the published benchmarks),
:mod:`~pipeline.data.benchmarks.generic` (generic tables and the prepared index),
:mod:`~pipeline.data.benchmarks.hub` (Hugging Face datasets) and
:mod:`~pipeline.data.benchmarks.sampling`. This module is the registry and re-exports their names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.data.benchmarks.generic import GENERIC_LABELS, load_generic, load_prepared
from pipeline.data.benchmarks.hub import load_hf
from pipeline.data.benchmarks.readers import (
    FIGSTEP_PROMPT,
    MMSB_VARIANTS,
    load_alpaca_seed,
    load_figstep,
    load_jailbreakv,
    load_mm_safetybench,
    load_mm_vet,
    load_vlsafe,
    load_xstest,
)
from pipeline.data.benchmarks.sampling import sample_examples
from pipeline.data.benchmarks.schema import EvalExample, LoaderError

__all__ = [
    "FIGSTEP_PROMPT",
    "GENERIC_LABELS",
    "LOADERS",
    "MMSB_VARIANTS",
    "EvalExample",
    "LoaderError",
    "load_alpaca_seed",
    "load_benchmark",
    "load_figstep",
    "load_generic",
    "load_hf",
    "load_jailbreakv",
    "load_mm_safetybench",
    "load_mm_vet",
    "load_prepared",
    "load_vlsafe",
    "load_xstest",
    "sample_examples",
]

LOADERS: dict[str, Callable[..., list[EvalExample]]] = {
    "mm-safetybench": load_mm_safetybench,
    "figstep": load_figstep,
    "vlsafe": load_vlsafe,
    "mm-vet": load_mm_vet,
    "xstest": load_xstest,
    "jailbreakv": load_jailbreakv,
    "generic": load_generic,
    "alpaca-seed": load_alpaca_seed,
    "prepared": load_prepared,
    "hf": load_hf,
}


def load_benchmark(kind: str, **kwargs: Any) -> list[EvalExample]:
    """Load a benchmark by ``kind`` (a key of :data:`LOADERS`) with that loader's keyword arguments."""
    if kind not in LOADERS:
        raise LoaderError(f"unknown benchmark kind {kind!r}; known: {sorted(LOADERS)}")
    return LOADERS[kind](**kwargs)
