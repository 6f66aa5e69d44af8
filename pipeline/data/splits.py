"""Split assignment: whole requests go to one split each, stratified by label and category.

Rows that share a request are grouped, or a detector would be scored on requests it was
trained on.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
import polars as pl
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.config import LABELS, SPLITS, PrepareConfig
from pipeline.data.sources import DatasetError

SPLIT_FOLDS = 20


def _fold_counts(fractions: Sequence[float], n_folds: int) -> list[int]:
    """Folds per split in proportion to ``fractions`` (largest remainder), at least one each."""
    raw = [f * n_folds for f in fractions]
    counts = [max(1, math.floor(r)) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    i = 0
    while sum(counts) < n_folds:
        counts[by_remainder[i % len(raw)]] += 1
        i += 1
    while sum(counts) > n_folds:
        # Only reachable when the one-fold minimum pushed a split up; take from the largest.
        counts[counts.index(max(counts))] -= 1
    return counts


def assign_splits(groups: Sequence[str], strata: Sequence[str], config: PrepareConfig) -> list[str]:
    """Split rows so that no group spans two splits, stratified by ``strata``.

    ``StratifiedGroupKFold`` cuts the groups into up to 20 folds with similar stratum mixes;
    whole folds then go to the splits in proportion to ``config.split_fractions``.
    """
    n_groups = len(set(groups))
    if n_groups < len(SPLITS):
        raise DatasetError(f"need at least {len(SPLITS)} distinct requests to fill {list(SPLITS)}, got {n_groups}")
    largest = max(Counter(strata).values())
    if largest < len(SPLITS):
        # Too few rows per stratum to stratify at all (tiny sources): keep only the grouping.
        strata, largest = ["all"] * len(groups), len(groups)
    # scikit-learn refuses more folds than the largest stratum has rows.
    n_folds = min(SPLIT_FOLDS, n_groups, largest)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=config.seed)
    fold_of = np.empty(len(groups), dtype=np.int64)
    with warnings.catch_warnings():
        # Strata smaller than the fold count are expected on small sources; the split is still grouped.
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, test) in enumerate(splitter.split(np.zeros(len(groups)), list(strata), list(groups))):
            fold_of[test] = fold
    names = [name for name, _ in config.split_fractions]
    counts = _fold_counts([fraction for _, fraction in config.split_fractions], n_folds)
    split_of_fold = [name for name, count in zip(names, counts, strict=True) for _ in range(count)]
    return [split_of_fold[fold] for fold in fold_of]


def check_splits(index: pl.DataFrame) -> None:
    """Every split needs both labels: training, calibration and scoring all compare them."""
    names = {value: key for key, value in LABELS.items()}
    for split in SPLITS:
        present = set(index.filter(pl.col("split") == split)["label"].to_list())
        lacking = [names[label] for label in sorted(names) if label not in present]
        if lacking:
            raise DatasetError(
                f"split '{split}' has no {' or '.join(lacking)} rows; add requests or change prepare.splits"
            )
