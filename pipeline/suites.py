"""Comparison suites: the benchmarks a ``compare.suites`` entry names, loaded and sampled.

Each :class:`~pipeline.config.BenchmarkSpec` is loaded with its loader, renamed to the spec's
name (so two variants of one benchmark stay apart in every table) and cut to its ``limit`` by
:func:`~pipeline.loaders.sample_examples`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pipeline.config import BenchmarkSpec
from pipeline.loaders import LOADERS, EvalExample, LoaderError, load_benchmark, sample_examples


def load_spec(spec: BenchmarkSpec, seed: int, render_root: Path) -> list[EvalExample]:
    """One benchmark's examples, named ``spec.name`` and sampled to ``spec.limit``.

    A loader that can render images (typography from text) renders them under
    ``render_root / spec.name`` unless the spec gives its own ``render_dir``.
    """
    kwargs = spec.kwargs
    if "render_dir" in inspect.signature(LOADERS[spec.kind]).parameters:
        kwargs.setdefault("render_dir", str(render_root / spec.name))
    # Folder options come from YAML as text; an empty one means "none" (render instead, or text only).
    for key in ("render_dir", "images", "coco_images"):
        if key in kwargs:
            kwargs[key] = Path(kwargs[key]) if kwargs[key] else None
    try:
        examples = load_benchmark(spec.kind, **kwargs)
    except TypeError as exc:  # a loader option of the wrong type, named by the loader
        raise LoaderError(f"benchmark {spec.name!r} ({spec.kind}): {exc}") from None
    renamed = [replace(example, benchmark=spec.name) for example in examples]
    return sample_examples(renamed, spec.limit, seed)


def load_suite(specs: Sequence[BenchmarkSpec], seed: int, render_root: Path) -> list[EvalExample]:
    """Every benchmark of a suite, in the order listed."""
    examples: list[EvalExample] = []
    for spec in specs:
        examples.extend(load_spec(spec, seed, render_root))
    return examples
