"""What every stage shares: sampling, request building, atomic writes, and one clear error line for bad input."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl

from pipeline.io import write_text_atomic
from pipeline.layout import CALIBRATION, INDEX, PARAMS, PROBE_DIR, STORE  # noqa: F401 (re-exported for stages)
from pipeline.models.base import Request

T = TypeVar("T")

HARMFUL, BENIGN = 1, 0


# Generation holds a KV cache per request; a small batch keeps memory flat on a laptop or a GPU.
BATCH_SIZE = 4


def write_json_atomic(path: Path, value: Any) -> None:
    """One JSON document, atomically."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, atomically."""
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def row_request(row: Mapping[str, Any]) -> Request:
    """The model request for one index row (image path as stored, or none)."""
    image = row.get("image_path")
    return Request(text=str(row["text"]), image=Path(image) if image else None)


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def row_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The index columns every output line repeats, so a line can be read on its own."""
    return {key: row.get(key) for key in ("row_id", "label", "category", "text", "image_path")}


def balanced_test_sample(index: pl.DataFrame, sample_size: int, seed: int) -> pl.DataFrame:
    """A deterministic sample of test-split rows, half harmful and half benign, sorted by ``row_id``.

    Rows are sorted by ``row_id`` before drawing so the sample does not depend on the index's
    row order. Harmful gets the odd row out. When one label has too few rows, the other fills
    the gap, so the sample is as large as the test split allows.
    """
    if sample_size < 1:
        raise ValueError(f"sample_size must be at least 1, got {sample_size}")
    test = index.filter(pl.col("split") == "test").sort("row_id")
    if test.height == 0:
        raise ValueError("the index has no test-split rows to sample from")
    rng = np.random.default_rng(seed)
    ids = {label: test.filter(pl.col("label") == label)["row_id"].to_numpy() for label in (HARMFUL, BENIGN)}
    shuffled = {label: ids[label][rng.permutation(len(ids[label]))] for label in (HARMFUL, BENIGN)}
    quota = {HARMFUL: (sample_size + 1) // 2, BENIGN: sample_size // 2}
    take = {label: min(quota[label], len(ids[label])) for label in (HARMFUL, BENIGN)}
    shortfall = sample_size - sum(take.values())
    for label in (HARMFUL, BENIGN):
        extra = min(shortfall, len(ids[label]) - take[label])
        take[label] += extra
        shortfall -= extra
    chosen = np.concatenate([shuffled[label][: take[label]] for label in (HARMFUL, BENIGN)])
    return test.filter(pl.col("row_id").is_in(chosen.tolist())).sort("row_id")


def rate(records: Sequence[Mapping[str, Any]], key: str, label: int) -> float | None:
    """Fraction of records with ``label`` whose ``key`` is true; None (JSON null) when there are none."""
    values = [bool(r[key]) for r in records if r["label"] == label]
    return sum(values) / len(values) if values else None


def _known_errors() -> tuple[type[BaseException], ...]:
    """Failures caused by input or set-up, which deserve one clear line rather than a traceback."""
    from pipeline.config import ConfigError
    from pipeline.data.images import ImageError
    from pipeline.data.sources import DatasetError
    from pipeline.defend.guard import GuardLoadError
    from pipeline.detect.calibration import CalibrationError
    from pipeline.detect.extraction import ExtractionError
    from pipeline.detect.store import StoreError
    from pipeline.evaluate.judges import JudgeError
    from pipeline.models.base import ModelLoadError
    from pipeline.models.ocr import UnreadableImage
    from pipeline.models.smollm2_files import EmbeddedModelMissing
    from stages.compare import ResumeMismatch

    return (
        CalibrationError,
        ConfigError,
        DatasetError,
        ExtractionError,
        GuardLoadError,
        ImageError,
        JudgeError,
        ResumeMismatch,
        ModelLoadError,
        UnreadableImage,
        EmbeddedModelMissing,
        StoreError,
        FileNotFoundError,
    )


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; expected failures print one ``error:`` line naming the problem and exit 1."""
    try:
        main()
    except _known_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


SWEEP = Path("data/sweep/sweep.json")


def load_eval_data(index: pl.DataFrame, store_path: Path = STORE, refusal: np.ndarray | None = None) -> Any:
    """Every index row's stored states (all framings and layers) in index order, as :class:`EvalData`.

    ``refusal``: per-store-row refusal-direction scores, reordered here to the index's order.
    """
    from pipeline.detect.features import rows_in_order, store_positions
    from pipeline.detect.heldout import EvalData
    from pipeline.detect.store import ActivationStore

    store = ActivationStore.open(store_path)
    positions = store_positions(store, index["row_id"].to_numpy())
    layers = tuple(store.provenance.layers)
    states = rows_in_order(store.layer_states(list(layers)), positions, store_path)
    return EvalData(index, states, layers, None if refusal is None else refusal[positions])


def resolve_layers(fusion_layer: int | str, safety_layer: int | str, select_by: str) -> tuple[int, int]:
    """The layers to train at: fixed ones as given, ``best`` ones from the sweep stage's results."""
    from pipeline.config import LAYER_CHOICE
    from pipeline.detect.sweep import PairScore, best_pair

    if fusion_layer != LAYER_CHOICE and safety_layer != LAYER_CHOICE:
        return int(fusion_layer), int(safety_layer)
    if not SWEEP.is_file():
        raise FileNotFoundError(f"{SWEEP}: no layer sweep to take 'best' layers from; run 'dvc repro sweep'")
    scores = [PairScore(**row) for row in json.loads(SWEEP.read_text())["pairs"]]
    allowed = [
        s
        for s in scores
        if fusion_layer in (LAYER_CHOICE, s.fusion_layer) and safety_layer in (LAYER_CHOICE, s.safety_layer)
    ]
    if not allowed:
        raise ValueError(f"{SWEEP}: no swept pair has fusion layer {fusion_layer} and safety layer {safety_layer}")
    best = best_pair(allowed, select_by)
    return best.fusion_layer, best.safety_layer
