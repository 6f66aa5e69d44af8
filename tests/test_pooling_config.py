"""``extract.pooling`` and ``extract.layers: all``: validation, resolution and what the store expects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import VARIANTS, ConfigError, ExtractConfig, load_params, params_from_dict, pooled_variants
from pipeline.config.pooling import pooling_reads, read_name
from pipeline.detect.provenance import expected_provenance
from tests.paths import PROJECT_ROOT


def test_the_library_default_is_the_methods_last_token_read() -> None:
    # The dataclass keeps the method's read; the shipped study reads both, since the lever table's
    # pooled detectors need the mean read too (docs/findings.md).
    assert ExtractConfig().pooling == "last"
    assert pooled_variants(VARIANTS, "last") == VARIANTS


def test_the_shipped_study_reads_both_poolings_its_detector_needs() -> None:
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert params.extract.pooling == "both"
    assert pooled_variants(VARIANTS, "both") == (*VARIANTS, "benign_mean", "malicious_mean", "plain_mean")


def test_poolings_name_their_reads() -> None:
    assert pooling_reads("mean") == ("mean",) and pooling_reads("both") == ("last", "mean")
    assert pooled_variants(("benign", "plain"), "both") == ("benign", "plain", "benign_mean", "plain_mean")
    assert read_name("plain", "mean") == "plain_mean"
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pooling_reads("max")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"pooling": "max"}, r"extract.pooling: expected one of \['last', 'mean', 'both'\], got 'max'"),
        ({"pooling": True}, r"extract.pooling: expected one of"),
        ({"layers": "every"}, r"extract.layers: expected 'all' or a list of one or more distinct whole numbers"),
        ({"layers": []}, r"extract.layers: expected a list of one or more distinct whole numbers"),
    ],
)
def test_bad_extract_values_are_named(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        params_from_dict({"extract": section})


def test_all_layers_resolve_to_every_block_of_the_model(tmp_path: Path) -> None:
    params = params_from_dict(
        {
            "extract": {"layers": "all", "pooling": "both"},
            "train": {"fusion_layer": 4, "safety_layer": 1},  # not checkable before the model is known
            "model": {"path": str(tmp_path), "device": "cpu"},
        }
    )
    assert params.extract.resolved_layers(5) == (0, 1, 2, 3, 4)
    assert ExtractConfig(layers=(3, 1)).resolved_layers(5) == (3, 1)
    (tmp_path / "lsi_guard_model.json").write_text(json.dumps({"name": "tiny", "source_sha256": "ab" * 32}))
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 5, "hidden_size": 8}))
    provenance = expected_provenance(params)
    assert provenance.layers == (0, 1, 2, 3, 4)
    assert provenance.pooling == "both" and provenance.variants == pooled_variants(VARIANTS, "both")
