"""Comparison suites: the benchmarks a ``compare.suites`` entry names, loaded and sampled.

Each :class:`~pipeline.config.BenchmarkSpec` is loaded with its loader, renamed to the spec's
name (so two variants of one benchmark stay apart in every table) and cut to its ``limit`` by
:func:`~pipeline.data.benchmarks.loaders.sample_examples`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pipeline.config import BenchmarkSpec, CompareConfig, ConfigError
from pipeline.data.benchmarks.loaders import LOADERS, EvalExample, LoaderError, load_benchmark, sample_examples


def check_spec(spec: BenchmarkSpec) -> None:
    """Refuse a benchmark whose kind is no loader, or whose options do not fit the loader's signature."""
    where = f"benchmark {spec.name!r}"
    if spec.kind not in LOADERS:
        raise ConfigError(f"{where}: unknown kind {spec.kind!r}; known: {sorted(LOADERS)}")
    parameters = inspect.signature(LOADERS[spec.kind]).parameters
    unknown = sorted(key for key, _ in spec.options if key not in parameters)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown} for kind {spec.kind!r}; it takes {list(parameters)}")
    given = {key for key, _ in spec.options}
    missing = [
        name
        for name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty and name not in given
    ]
    if missing:
        raise ConfigError(f"{where}: kind {spec.kind!r} needs option(s) {missing}")


def check_suites(config: CompareConfig) -> None:
    """Check every suite's benchmarks against their loaders; errors name ``compare.suites.<suite>[i]``."""
    for suite, specs in config.suites:
        for number, spec in enumerate(specs):
            try:
                check_spec(spec)
            except ConfigError as exc:
                raise ConfigError(f"compare.suites.{suite}[{number}]: {exc}") from None


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
