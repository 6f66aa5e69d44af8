"""Stores and probes record the torch and transformers versions that wrote them; readers under others are warned."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from pipeline.detect.probe import LSIProbe, ProbeMeta, load_probe, save_probe
from pipeline.detect.shipped import load_detector
from pipeline.detect.store import ActivationStore
from pipeline.run_record import HIDDEN_STATE_LIBRARIES, LibraryVersionWarning, library_versions
from tests.detect.test_store import provenance, write_store

HIDDEN = 8
OLD = {"torch": "2.12.0", "transformers": "5.0.1"}


def test_a_store_records_the_versions_and_warns_a_reader_under_others(tmp_path: Path) -> None:
    path = tmp_path / "store.zarr"
    write_store(path)
    store = ActivationStore.open(path, expected=provenance())
    assert store.group.attrs["library_versions"] == library_versions(HIDDEN_STATE_LIBRARIES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LibraryVersionWarning)
        ActivationStore.open(path, expected=provenance())

    store = ActivationStore.open_for_writing(path)
    store.group.attrs["library_versions"] = OLD
    now = library_versions(HIDDEN_STATE_LIBRARIES)
    expected = (
        f"{path} was written with torch 2.12.0, transformers 5.0.1; "
        f"this is torch {now['torch']}, transformers {now['transformers']}: hidden states may differ"
    )
    with pytest.warns(LibraryVersionWarning) as caught:
        opened = ActivationStore.open(path, expected=provenance())
    assert str(caught[0].message) == expected
    assert opened.num_rows == 10  # a warning, never a refusal

    del store.group.attrs["library_versions"]  # a store written before versions were recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error", LibraryVersionWarning)
        ActivationStore.open(path, expected=provenance())


def test_a_probe_records_the_versions_and_warns_a_reader_under_others(tmp_path: Path) -> None:
    meta = ProbeMeta(
        hidden_size=HIDDEN,
        alpha=0.1,
        fusion_layer=3,
        safety_layer=1,
        best_epoch=2,
        best_val_auroc=0.9,
        store_provenance={"model_name": "tiny"},
    )
    save_probe(LSIProbe(HIDDEN), meta, tmp_path)
    raw = json.loads((tmp_path / "probe.json").read_text())
    assert raw["library_versions"] == library_versions(HIDDEN_STATE_LIBRARIES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LibraryVersionWarning)
        _, loaded = load_probe(tmp_path)
    assert loaded == meta  # the versions are beside the metadata, not in it

    raw["library_versions"] = {**library_versions(HIDDEN_STATE_LIBRARIES), "transformers": "5.0.1"}
    (tmp_path / "probe.json").write_text(json.dumps(raw))
    with pytest.warns(
        LibraryVersionWarning, match=r"probe\.json was written with transformers 5\.0\.1; this is transformers"
    ):
        _, loaded = load_detector(tmp_path)
    assert loaded == meta

    del raw["library_versions"]  # a probe saved before versions were recorded
    (tmp_path / "probe.json").write_text(json.dumps(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LibraryVersionWarning)
        assert load_probe(tmp_path)[1] == meta
