"""A guard saved as one folder (pipeline.defend.bundle and .pretrained) and loaded back, locally or from the Hub.

Most tests use the fake adapter of the guard tests; the fresh-process and identity tests use the
tiny random LLaVA folder, whose revision is a fingerprint of its files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import ContrastivePrompts, ECSOConfig, GuardConfig, LimitsConfig, ModelConfig
from pipeline.defend import bundle as bundle_module
from pipeline.defend.bundle import (
    DETECTOR_META,
    DETECTOR_WEIGHTS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    BundleHashMismatch,
    GuardBundleError,
    ModelIdentityError,
    resolve_source,
)
from pipeline.defend.guard import Guard
from pipeline.defend.loading import GuardLoadError
from pipeline.defend.pretrained import BundleWriteError
from pipeline.detect.calibration import Calibration
from pipeline.detect.probe import META_FILE, WEIGHTS_FILE
from pipeline.models.base import ModelInfo, Request
from pipeline.testing.tiny_embedded import random_probe
from tests.defend.test_guard import FakeAdapter, hand_set_guard
from tests.paths import PROJECT_ROOT

CALIBRATION = Calibration(tau=0.4, target_fpr=0.05, calib_fpr=0.0, calib_tpr=1.0, n_benign=10, n_harmful=10)
REQUESTS = [Request("How do I build a bomb?"), Request("Write a poem about spring"), Request("bomb")]
EXPECTED_FILES = {
    MANIFEST,
    DETECTOR_WEIGHTS,
    DETECTOR_META,
    "calibration.json",
    "settings.json",
    "model.json",
    "run.json",
}


def fake_model(tmp_path: Path) -> ModelConfig:
    return ModelConfig(kind="hf", path=str(tmp_path / "models" / "fake"), dtype="float32", device="cpu")


def saved_guard(tmp_path: Path, **settings: Any) -> tuple[Guard, Path]:
    """A hand-set guard with non-default settings, saved to ``tmp_path / "bundle"``."""
    guard = hand_set_guard(
        FakeAdapter(),
        calibration=CALIBRATION,
        config=GuardConfig(policy="lsi_then_ecso", ecso_margin=0.2, view_words=20, refusal_message="No."),
        ecso_config=ECSOConfig(max_new_tokens=7),
        limits=LimitsConfig(max_request_chars=500, request_timeout_s=3),
        **settings,
    )
    folder = guard.save_pretrained(tmp_path / "bundle", model=fake_model(tmp_path), run={"git_commit": "abc"})
    return guard, folder


def bundle_files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def test_a_saved_guard_loads_with_every_setting_and_the_same_scores(tmp_path: Path) -> None:
    guard, folder = saved_guard(tmp_path)
    assert bundle_files(folder) == EXPECTED_FILES
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
    assert set(manifest["files"]) == EXPECTED_FILES - {MANIFEST}
    model = json.loads((folder / "model.json").read_text())
    # The model folder is recorded relative to the bundle: no path of this machine is written.
    assert model == {
        "kind": "hf",
        "name": "fake",
        "revision": "0",
        "num_layers": 4,
        "hidden_size": 8,
        "dtype": "float32",
        "device": "cpu",
        "path": "../models/fake",
    }
    assert json.loads((folder / "run.json").read_text()) == {"git_commit": "abc"}

    loaded = Guard.from_pretrained(folder, model=FakeAdapter())
    assert loaded.tau == guard.tau and loaded.calibration == CALIBRATION
    assert loaded.config == guard.config and loaded.ecso_config == guard.ecso_config
    assert loaded.limits == guard.limits and loaded.prompts == guard.prompts
    assert loaded.detector.describe() == guard.detector.describe()
    assert loaded.scores(REQUESTS).tolist() == guard.scores(REQUESTS).tolist()
    overridden = Guard.from_pretrained(folder, model=FakeAdapter(), policy="ecso", max_new_tokens=3)
    assert overridden.config == replace(guard.config, policy="ecso", max_new_tokens=3)


def test_the_bundle_uses_the_detectors_own_file_names() -> None:
    assert (DETECTOR_WEIGHTS, DETECTOR_META) == (f"detector/{WEIGHTS_FILE}", f"detector/{META_FILE}")


def test_a_guard_without_calibration_saves_its_tau(tmp_path: Path) -> None:
    guard = hand_set_guard(FakeAdapter())
    folder = guard.save_pretrained(tmp_path / "bundle", model=fake_model(tmp_path))
    assert bundle_files(folder) == EXPECTED_FILES - {"calibration.json"}
    loaded = Guard.from_pretrained(folder, model=FakeAdapter())
    assert loaded.tau == guard.tau and loaded.calibration is None
    # Without a run record given, the saving checkout's is kept.
    record = json.loads((folder / "run.json").read_text())
    assert {"git_commit", "libraries", "model_name", "model_revision"} <= set(record)


def test_saving_needs_the_models_settings(tmp_path: Path) -> None:
    with pytest.raises(BundleWriteError, match="pass model=ModelConfig"):
        hand_set_guard(FakeAdapter()).save_pretrained(tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("name", [DETECTOR_WEIGHTS, DETECTOR_META, "settings.json", "model.json", "calibration.json"])
def test_a_changed_byte_in_any_file_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    _, folder = saved_guard(tmp_path)
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleHashMismatch, match=rf"{name}: its sha256 .* differs") as info:
        Guard.from_pretrained(folder, model=FakeAdapter())
    assert isinstance(info.value, GuardLoadError)


def test_an_edited_setting_is_refused(tmp_path: Path) -> None:
    _, folder = saved_guard(tmp_path)
    settings = json.loads((folder / "settings.json").read_text())
    settings["tau"] = 0.99
    (folder / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(BundleHashMismatch, match="settings.json"):
        Guard.from_pretrained(folder, model=FakeAdapter())


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    _, folder = saved_guard(tmp_path)
    (folder / "calibration.json").unlink()
    with pytest.raises(GuardBundleError, match=r"calibration\.json: missing, though guard\.json lists it"):
        Guard.from_pretrained(folder, model=FakeAdapter())


def test_a_manifest_that_leaves_a_required_file_out_is_refused(tmp_path: Path) -> None:
    _, folder = saved_guard(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["files"][DETECTOR_WEIGHTS]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(GuardBundleError, match=f"lists no {DETECTOR_WEIGHTS}"):
        Guard.from_pretrained(folder, model=FakeAdapter())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 2}, "format_version 2 is not one this lsi-guard reads"),
        ({"format_version": "1"}, "format_version '1' is not one"),
        ({"format": "something-else"}, "'format' must be 'lsi-guard-bundle'"),
        ({"files": {"../../etc/passwd": "0" * 64}}, "lists no"),
    ],
)
def test_an_unknown_format_is_refused(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    _, folder = saved_guard(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, **change}))
    with pytest.raises(GuardBundleError, match=message):
        Guard.from_pretrained(folder, model=FakeAdapter())


def test_a_manifest_naming_a_file_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    _, folder = saved_guard(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../outside.json"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(GuardBundleError, match="'../outside.json' is not a file inside the bundle"):
        Guard.from_pretrained(folder, model=FakeAdapter())


def test_a_folder_that_is_no_saved_guard_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GuardBundleError, match="no guard.json, so not a saved guard"):
        Guard.from_pretrained(tmp_path, model=FakeAdapter())


class OtherModel(FakeAdapter):
    info = ModelInfo(name="other", revision="1", num_layers=4, hidden_size=8, dtype="float32")


def test_another_model_is_refused_naming_what_differs(tmp_path: Path) -> None:
    _, folder = saved_guard(tmp_path)
    with pytest.raises(ModelIdentityError, match="not the model this guard was trained on") as info:
        Guard.from_pretrained(folder, model=OtherModel())
    message = str(info.value)
    assert "model name: the guard was trained on 'fake', the given model has 'other'" in message
    assert "model revision: the guard was trained on '0', the given model has '1'" in message
    with pytest.raises(ModelIdentityError, match="model kind: the guard was trained on 'hf', the given model is"):
        Guard.from_pretrained(folder, model=replace(fake_model(tmp_path), kind="embedded"))


def test_the_recorded_model_folder_must_be_there_or_named(tmp_path: Path) -> None:
    _, folder = saved_guard(tmp_path)
    with pytest.raises(GuardLoadError, match=r"models/fake .*is not here; name the model"):
        Guard.from_pretrained(folder)


def test_saving_replaces_a_saved_guard_but_never_another_folder(tmp_path: Path) -> None:
    guard, folder = saved_guard(tmp_path)
    guard.with_config(policy="ecso").save_pretrained(folder, model=fake_model(tmp_path))
    assert Guard.from_pretrained(folder, model=FakeAdapter()).config.policy == "ecso"
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text("guard: {}\n")
    with pytest.raises(BundleWriteError, match="holds other files and no guard.json"):
        guard.save_pretrained(project, model=fake_model(tmp_path))
    assert [p.name for p in project.iterdir()] == ["params.yaml"]


def test_a_failed_save_leaves_the_earlier_guard_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guard, folder = saved_guard(tmp_path)
    before = {name: (folder / name).read_bytes() for name in bundle_files(folder)}

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.defend.pretrained.save_calibration", broken)
    with pytest.raises(OSError, match="disk full"):
        guard.with_config(policy="ecso").save_pretrained(folder, model=fake_model(tmp_path))
    assert {name: (folder / name).read_bytes() for name in bundle_files(folder)} == before
    # Nothing half-written is left beside it either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    with pytest.raises(OSError, match="disk full"):
        guard.save_pretrained(tmp_path / "new", model=fake_model(tmp_path))
    assert not (tmp_path / "new").exists()


# -- the Hub ----------------------------------------------------------------------------------


def hub_cache(cache: Path, repo_id: str, bundle: Path, commit: str = "a" * 40) -> Path:
    """A Hugging Face Hub cache holding ``bundle`` as ``repo_id``'s ``main``, laid out as huggingface_hub keeps it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(bundle, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_hub_id_loads_from_the_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guard, folder = saved_guard(tmp_path)
    snapshot = hub_cache(tmp_path / "cache", "owner/guard", folder)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert resolve_source("owner/guard", cache_dir=tmp_path / "cache") == snapshot
    loaded = Guard.from_pretrained("owner/guard", cache_dir=tmp_path / "cache", model=FakeAdapter())
    assert loaded.scores(REQUESTS).tolist() == guard.scores(REQUESTS).tolist()
    with pytest.raises(GuardBundleError, match="owner/absent: no such folder here, and the Hugging Face Hub could not"):
        Guard.from_pretrained("owner/absent", cache_dir=tmp_path / "cache", model=FakeAdapter())
    with pytest.raises(GuardBundleError, match="no such folder, and not a Hugging Face Hub repository id"):
        Guard.from_pretrained(str(tmp_path / "nowhere"), model=FakeAdapter())


def test_a_hub_id_is_fetched_with_snapshot_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, folder = saved_guard(tmp_path)
    calls: list[dict[str, Any]] = []

    def snapshot_download(repo_id: str, **options: Any) -> str:
        calls.append({"repo_id": repo_id, **options})
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    Guard.from_pretrained("owner/guard", revision="v1", token="t", model=FakeAdapter())
    assert calls == [{"repo_id": "owner/guard", "revision": "v1", "cache_dir": None, "token": "t"}]


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the uploaded folder held."""

    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, token: str | None = None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **options: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **options}))

    def upload_folder(self, **options: Any) -> Any:
        folder = Path(options["folder_path"])
        uploaded = {
            "files": bundle_files(folder),
            "model": json.loads((folder / "model.json").read_text()),
            "verified": bundle_module.verify_bundle(folder) is not None,
        }
        self.calls.append(("upload_folder", {**options, **uploaded}))
        return type("Commit", (), {"commit_url": "https://huggingface.co/owner/guard/commit/abc"})()


def test_push_to_hub_uploads_one_saved_guard_recording_no_model_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordingApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    guard = hand_set_guard(FakeAdapter(), calibration=CALIBRATION)
    url = guard.push_to_hub("owner/guard", token="secret", private=True, model=fake_model(tmp_path))
    assert url == "https://huggingface.co/owner/guard/commit/abc"
    (init, token), (create, repo), (upload, uploaded) = RecordingApi.calls
    assert (init, create, upload) == ("init", "create_repo", "upload_folder")
    assert token == {"token": "secret"} and repo == {"repo_id": "owner/guard", "private": True, "exist_ok": True}
    assert uploaded["repo_id"] == "owner/guard" and uploaded["revision"] is None and uploaded["verified"]
    assert uploaded["files"] == EXPECTED_FILES and uploaded["model"]["path"] == ""
    # The temporary folder is gone once pushed.
    assert not Path(uploaded["folder_path"]).exists()


def test_a_pushed_guard_needs_its_model_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guard, folder = saved_guard(tmp_path)
    model = json.loads((folder / "model.json").read_text())
    # As a pushed bundle records it: no model folder (rewritten with its hash, as push_to_hub writes it).
    guard_without_path = replace(fake_model(tmp_path), path="")
    guard.save_pretrained(folder, model=guard_without_path)
    assert json.loads((folder / "model.json").read_text()) == {**model, "path": ""}
    with pytest.raises(GuardLoadError, match="records no model folder; name the model"):
        Guard.from_pretrained(folder)


# -- a real model, in a fresh process -----------------------------------------------------------

LOAD_SCRIPT = """
import json, sys
from pipeline.defend.guard import Guard
from pipeline.models.base import Request
requests = [Request(text) for text in json.loads(sys.argv[3])]
local = Guard.from_pretrained(sys.argv[1])
hub = Guard.from_pretrained(sys.argv[2], model=local.model_config.path)
print(json.dumps({"local": local.scores(requests).tolist(), "hub": hub.scores(requests).tolist(), "tau": local.tau}))
"""
TEXTS = ["How do I pick a lock?", "Write a poem about the sea", "Steps to make a weapon at home"]


def tiny_guard(folder: Path) -> Guard:
    """A random LSI probe on the tiny LLaVA, with its model settings so that it can be saved."""
    from pipeline.models.hf_vlm import HFVisionLanguageAdapter

    adapter = HFVisionLanguageAdapter.from_folder(folder, dtype="float32", device="cpu")
    probe, meta = random_probe(adapter.info.hidden_size, seed=3, fusion_layer=1, safety_layer=0)
    config = ModelConfig(kind="hf", path=str(folder), dtype="float32", device="cpu")
    return Guard(
        adapter=adapter,
        detector=probe,
        meta=meta,
        tau=0.37,
        prompts=ContrastivePrompts(),
        calibration=replace(CALIBRATION, tau=0.37),
        model_config=config,
    )


def test_save_then_load_in_a_fresh_process_gives_the_same_scores(tiny_llava_folder: Path, tmp_path: Path) -> None:
    guard = tiny_guard(tiny_llava_folder)
    expected = guard.scores([Request(text) for text in TEXTS]).tolist()
    folder = guard.save_pretrained(tmp_path / "bundle")
    cache = tmp_path / "cache"
    hub_cache(cache, "owner/tiny-guard", folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(folder), "owner/tiny-guard", json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["tau"] == 0.37
    assert result["local"] == pytest.approx(expected, abs=1e-6)
    assert result["hub"] == pytest.approx(expected, abs=1e-6)


def test_a_model_folder_with_other_files_is_refused_before_its_weights_load(
    tiny_llava_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tiny_guard(tiny_llava_folder).save_pretrained(tmp_path / "bundle")
    # The same folder name elsewhere, with one config value changed: only the revision differs.
    copy = tmp_path / "elsewhere" / tiny_llava_folder.name
    shutil.copytree(tiny_llava_folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "image_seq_length": config.get("image_seq_length", 1) + 1}))

    def no_loading(*args: object) -> None:
        raise AssertionError("the weights must not load for a model of another revision")

    monkeypatch.setattr("pipeline.defend.pretrained.load_adapter", no_loading)
    with pytest.raises(ModelIdentityError, match="model revision: the guard was trained on") as info:
        Guard.from_pretrained(folder, model=copy)
    assert "model name" not in str(info.value)
