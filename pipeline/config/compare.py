"""The ``compare`` section: which defences the comparison runs, on which benchmark suites, judged how."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.checks import ConfigError, choice, from_raw, positive, refuse, text, whole
from pipeline.config.checks import number as in_interval
from pipeline.config.sections import MODEL_KINDS

JUDGE_KINDS: tuple[str, ...] = ("refusal_phrases", "model", "http")
# The judge presets (pipeline/evaluate/judges/presets.py); "" is the plain question. Llama Guard
# needs chat messages with an assistant turn, which only the http judge sends.
JUDGE_PRESETS: tuple[str, ...] = ("", "harmbench", "llama_guard", "llama_guard_vision", "strongreject")
HTTP_ONLY_PRESETS: tuple[str, ...] = ("llama_guard", "llama_guard_vision")
COMPARE_DEFENCES: tuple[str, ...] = ("none", "lsi", "ecso", "lsi_then_ecso")


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """Which judge scores the comparison's responses (see :mod:`pipeline.evaluate.judges`).

    ``refusal_phrases`` (offline, the default) only says whether a response refuses. ``model``
    asks a local model whether a response is harmful: ``model_path`` is a supported model folder
    of kind ``model_kind`` (empty: the run's own model). ``http`` asks an OpenAI-compatible
    endpoint (``base_url``, ``model``), with the API key read from the environment variable
    ``api_key_env`` (empty: no key, for a local server), ``max_retries`` with backoff, at most
    ``requests_per_minute`` (0: no cap), ``concurrency`` requests in flight at once. ``cache``
    (an sqlite file; empty: none) keeps the model and HTTP judges' verdicts so a rerun never
    asks twice. ``prompt`` replaces the default question; it must hold ``{request}`` and
    ``{response}``. ``preset`` picks a standard judge with its published prompt and parsing
    (``harmbench``, ``strongreject``; ``llama_guard`` and ``llama_guard_vision`` with ``http``
    only); "" asks the question of ``prompt``.
    """

    kind: str = "refusal_phrases"
    model_kind: str = "embedded"
    model_path: str = ""
    base_url: str = ""
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    requests_per_minute: float = 60.0
    max_retries: int = 4
    timeout_s: float = 60.0
    max_new_tokens: int = 8
    cache: str = "data/cache/judge.sqlite"
    prompt: str = ""
    preset: str = ""
    concurrency: int = 8

    def __post_init__(self) -> None:
        choice("compare.judge.kind", self.kind, JUDGE_KINDS)
        choice("compare.judge.model_kind", self.model_kind, MODEL_KINDS)
        for key in ("model_path", "base_url", "model", "api_key_env", "cache", "prompt"):
            text(f"compare.judge.{key}", getattr(self, key))
        in_interval("compare.judge.requests_per_minute", self.requests_per_minute, 0, low_open=False, high_open=True)
        whole("compare.judge.max_retries", self.max_retries)
        positive("compare.judge.timeout_s", self.timeout_s)
        whole("compare.judge.max_new_tokens", self.max_new_tokens, 1)
        whole("compare.judge.concurrency", self.concurrency, 1)
        self._check_preset()
        if self.kind == "http" and (not self.base_url.strip() or not self.model.strip()):
            raise ConfigError("compare.judge.kind http needs base_url (e.g. https://host/v1) and model")
        if self.prompt and ("{request}" not in self.prompt or "{response}" not in self.prompt):
            refuse("compare.judge.prompt", "text containing {request} and {response}", self.prompt)

    def _check_preset(self) -> None:
        """A preset needs a model-based judge (Llama Guard the http one) and brings its own prompt."""
        choice("compare.judge.preset", self.preset, JUDGE_PRESETS)
        if not self.preset:
            return
        if self.kind == "refusal_phrases":
            raise ConfigError(f"compare.judge.preset {self.preset} needs kind model or http, not refusal_phrases")
        if self.preset in HTTP_ONLY_PRESETS and self.kind != "http":
            raise ConfigError(
                f"compare.judge.preset {self.preset} needs kind http: Llama Guard's prompt is built by the served "
                "model's chat template from the conversation, which the model judge cannot send"
            )
        if self.prompt:
            raise ConfigError(f"compare.judge.prompt must be empty with preset {self.preset}, which has its own prompt")


@dataclass(frozen=True, kw_only=True)
class BenchmarkSpec:
    """One benchmark of a comparison suite: a loader ``kind`` with its options, and how many to keep.

    ``options`` are the loader's keyword arguments (paths relative to the project folder), checked
    against the loader's signature by :func:`pipeline.data.benchmarks.suites.check_suites`.
    ``limit`` keeps that many examples, balanced over label and category (0: all). ``name`` labels
    the benchmark in every table; it must be unique in the suite.
    """

    name: str
    kind: str
    limit: int = 0
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        # Whether ``kind`` and ``options`` fit a loader is checked by
        # :func:`pipeline.data.benchmarks.suites.check_suites`, which knows the loaders.
        where = f"benchmark {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name:
            refuse(f"{where}: name", "non-empty text without '/'", self.name)
        if not isinstance(self.kind, str) or not self.kind.strip():
            refuse(f"{where}: kind", "a loader name", self.kind)
        whole(f"{where}: limit (0: all)", self.limit)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The loader's keyword arguments."""
        return dict(self.options)


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """The defence comparison (``compare`` stage): which defences, on which suites, judged how.

    ``suites`` maps a suite name (``demo``, ``dev``, ...) to its benchmarks; the ``compare``
    stage runs the one it is given. ``max_new_tokens`` is the answers' budget (ECSO's steps keep
    theirs); ``batch_size`` examples go through the model at once; ``seed`` picks limited samples.
    """

    defences: tuple[str, ...] = COMPARE_DEFENCES
    batch_size: int = 4
    max_new_tokens: int = 64
    seed: int = 0
    examples_in_report: int = 6
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    suites: tuple[tuple[str, tuple[BenchmarkSpec, ...]], ...] = ()

    def __post_init__(self) -> None:
        defences = self.defences
        if (
            not isinstance(defences, tuple)
            or not defences
            or any(d not in COMPARE_DEFENCES for d in defences)
            or len(set(defences)) != len(defences)
        ):
            refuse("compare.defences", f"a list of distinct names from {list(COMPARE_DEFENCES)}", defences)
        whole("compare.batch_size", self.batch_size, 1)
        whole("compare.max_new_tokens", self.max_new_tokens, 1)
        whole("compare.seed", self.seed)
        whole("compare.examples_in_report", self.examples_in_report)
        if not isinstance(self.judge, JudgeConfig):
            refuse("compare.judge", "a mapping of judge settings", self.judge)
        for suite, specs in self.suites:
            names = [spec.name for spec in specs]
            if not specs:
                raise ConfigError(f"compare.suites.{suite} lists no benchmarks")
            if len(set(names)) != len(names):
                raise ConfigError(f"compare.suites.{suite}: benchmark names must be unique, got {names}")

    def suite(self, name: str) -> tuple[BenchmarkSpec, ...]:
        """The benchmarks of suite ``name``; an unknown name is refused, listing the known ones."""
        suites = dict(self.suites)
        if name not in suites:
            raise ConfigError(f"compare.suites has no suite {name!r}; known: {sorted(suites)}")
        return suites[name]


def compare_from_raw(raw: Any) -> CompareConfig:
    """The ``compare`` section from its parsed mapping, with the nested judge and suites built."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        refuse("compare", "a mapping of settings", raw)
    section = dict(raw)
    if "judge" in section:
        section["judge"] = from_raw(JudgeConfig, "compare.judge", section["judge"])
    suites = section.pop("suites", None) or {}
    if not isinstance(suites, Mapping):
        refuse("compare.suites", "a mapping of suite names to lists of benchmarks", suites)
    section["suites"] = tuple((str(suite), _suite(str(suite), entries)) for suite, entries in suites.items())
    return from_raw(CompareConfig, "compare", section)


def _suite(suite: str, entries: Any) -> tuple[BenchmarkSpec, ...]:
    """One suite's benchmarks; each error names the entry as ``compare.suites.NAME[i]``."""
    if not isinstance(entries, list):
        refuse(f"compare.suites.{suite}", "a list of benchmarks", entries)
    specs: list[BenchmarkSpec] = []
    for number, entry in enumerate(entries):
        where = f"compare.suites.{suite}[{number}]"
        if not isinstance(entry, Mapping) or "name" not in entry or "kind" not in entry:
            raise ConfigError(f"{where}: each benchmark needs at least 'name' and 'kind', got {entry!r}")
        options = tuple(sorted((str(k), v) for k, v in entry.items() if k not in ("name", "kind", "limit")))
        try:
            specs.append(
                BenchmarkSpec(name=entry["name"], kind=entry["kind"], limit=entry.get("limit", 0), options=options)
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return tuple(specs)
