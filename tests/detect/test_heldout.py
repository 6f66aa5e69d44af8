"""Held-out folds by upstream and presentation: siblings stay on one side, one-label groups meet the other label."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.config import TrainConfig
from pipeline.detect.heldout import (
    EvalData,
    HeldOutError,
    fold_setting,
    group_fold,
    group_folds,
    held_out_scores,
    scoreable_groups,
)
from pipeline.detect.sweep import held_out_group, held_out_settings

SPLITS = ("train", "val", "calib", "test")
# (upstream, label): two harmful-only upstreams, two benign-only ones, one of both labels.
UPSTREAMS = (("advbench", 1), ("harmbench", 1), ("alpaca", 0), ("orbench", 0), ("demo", None))
PRESENTATIONS = ("question", "imperative", "wrapped", "typography")


def index_of_upstreams(per_cell: int = 8) -> pl.DataFrame:
    """Every upstream shown in every presentation, each row in one split; the demo upstream holds both labels."""
    rows = []
    for upstream, label in UPSTREAMS:
        for presentation in PRESENTATIONS:
            for i in range(per_cell):
                rows.append(
                    {
                        "row_id": len(rows),
                        # Each built source mixes upstreams, as the public sources do.
                        "source": f"public-{presentation}",
                        "upstream": upstream,
                        "presentation": presentation,
                        "split": SPLITS[i % 4],
                        "label": label if label is not None else i // 4 % 2,
                        "text": f"{upstream} {presentation} {i}",
                        "category": "c",
                    }
                )
    return pl.DataFrame(rows)


def test_an_upstream_is_left_out_in_every_presentation() -> None:
    index = index_of_upstreams()
    fold = group_fold(index, "upstream", "advbench")
    setting = fold_setting(index, fold)
    upstream = index["upstream"].to_numpy()
    for role in ("train", "val", "calib"):
        rows = getattr(setting, role)
        assert len(rows) and "advbench" not in set(upstream[rows])
    # The held-out upstream's siblings in other presentations are held out with it.
    assert set(index["presentation"].to_numpy()[fold.own]) == set(PRESENTATIONS)
    assert set(upstream[fold.own]) == {"advbench"}


def test_a_one_label_upstream_is_scored_against_the_other_labels_held_out_rows() -> None:
    index = index_of_upstreams()
    labels, splits, upstream = (index[c].to_numpy() for c in ("label", "split", "upstream"))
    fold = group_fold(index, "upstream", "advbench")
    test = fold_setting(index, fold).test
    own = test[upstream[test] == "advbench"]
    contrast = test[upstream[test] != "advbench"]
    assert set(labels[own]) == {1} and set(labels[contrast]) == {0}
    assert set(splits[test]) == {"test"}  # never a row any detector of the fold trains or calibrates on
    # Every benign test row of the other upstreams is in the contrast, and nothing else.
    expected = np.flatnonzero((labels == 0) & (splits == "test") & (upstream != "advbench"))
    assert np.array_equal(contrast, expected)
    # A group holding both labels is scored on its own rows alone.
    demo = fold_setting(index, group_fold(index, "upstream", "demo")).test
    assert set(upstream[demo]) == {"demo"} and set(labels[demo]) == {0, 1}


def test_groups_by_presentation_and_source() -> None:
    index = index_of_upstreams()
    assert [f.group for f in group_folds(index, "presentation")] == sorted(PRESENTATIONS)
    assert scoreable_groups(index, "upstream") == sorted(u for u, _ in UPSTREAMS)
    fold = group_fold(index, "presentation", "wrapped")
    assert set(index["presentation"].to_numpy()[fold_setting(index, fold).train]) == {
        "question",
        "imperative",
        "typography",
    }


def test_unknown_grouping_and_missing_column_are_clear_errors() -> None:
    index = index_of_upstreams()
    with pytest.raises(HeldOutError, match="one of"):
        group_folds(index, "category")
    with pytest.raises(HeldOutError, match="no 'upstream' column.*prepare"):
        group_folds(index.drop("upstream"), "upstream")
    with pytest.raises(HeldOutError, match="no held-out fold for upstream 'nowhere'"):
        group_fold(index, "upstream", "nowhere")


def _data(index: pl.DataFrame, seed: int = 0) -> EvalData:
    """States where harmful rows move the malicious framing at the deepest layer."""
    rng = np.random.default_rng(seed)
    labels = index["label"].to_numpy()
    states = rng.normal(size=(index.height, 3, 2, 4)).astype(np.float32)
    states[:, 1, 1, 0] += 4.0 * labels
    return EvalData(index=index, states=states, layers=(1, 2))


def test_sweep_settings_and_calibration_scores_follow_the_configured_grouping() -> None:
    index = index_of_upstreams()
    data = _data(index)
    settings = held_out_settings(data.index, "upstream")
    assert sorted(held_out_group(s) for s in settings) == sorted(u for u, _ in UPSTREAMS)
    for s in settings:
        held = held_out_group(s)
        assert held not in set(index["upstream"].to_numpy()[s.train])
        assert set(index["split"].to_numpy()[s.test]) == {"val"}
    rows = np.flatnonzero(index["split"].to_numpy() == "calib")
    config = TrainConfig(fusion_layer=2, safety_layer=1, epochs=3, lr=2e-2, alpha=1.0)
    by_upstream = held_out_scores(data, rows, "logreg_delta", config, 2, 1)
    by_source = held_out_scores(data, rows, "logreg_delta", config, 2, 1, by="source")
    assert by_upstream.shape == rows.shape and not np.allclose(by_upstream, by_source)
    labels = index["label"].to_numpy()[rows]
    assert by_upstream[labels == 1].mean() > by_upstream[labels == 0].mean()


def test_a_group_without_test_rows_is_not_scoreable_on_the_test_split() -> None:
    index = pl.DataFrame(
        {
            "row_id": [f"r{i}" for i in range(8)],
            "label": [1, 0, 1, 0, 1, 0, 1, 0],
            "split": ["train", "train", "test", "test", "train", "train", "train", "val"],
            "upstream": ["a", "a", "a", "a", "b", "b", "c", "c"],
        }
    )
    assert scoreable_groups(index, "upstream") == ["a", "b", "c"]
    assert scoreable_groups(index, "upstream", split="test") == ["a"]  # b and c hold no test rows
