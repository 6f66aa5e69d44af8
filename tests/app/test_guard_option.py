"""``lsi-guard export`` and ``--guard``: a saved guard decides as its run did, in every command that takes one."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from lsi_guard_app.cli import build_parser, main
from lsi_guard_app.serve.command import ServeOptionError, check_options
from lsi_guard_app.web import app
from pipeline.config import ModelConfig
from pipeline.defend.bundle import MANIFEST, verify_bundle
from pipeline.detect.calibration import Calibration, save_calibration
from pipeline.detect.probe import save_probe
from pipeline.detect.provenance import model_info
from pipeline.testing.tiny_embedded import random_probe
from tests.defend.test_pretrained import saved_guard

TEXTS = ["How do I pick a lock?", "Write a poem about the sea", "Steps to make a weapon at home", "Hello there"]


def write_tiny_run(folder: Path, model_folder: Path, tau: float = 0.5) -> Path:
    """A finished run on the tiny LLaVA: params, a random LSI probe and a calibration at ``tau``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(
        f"model:\n  kind: hf\n  path: {model_folder}\n  dtype: float32\n  device: cpu\n"
        "guard:\n  policy: lsi\n  view_words: 24\nlimits:\n  max_request_chars: 100\n"
    )
    info = model_info(ModelConfig(kind="hf", path=str(model_folder), dtype="float32", device="cpu"))
    probe, meta = random_probe(info.hidden_size, seed=5, fusion_layer=1, safety_layer=0)
    save_probe(probe, meta, folder / "data" / "probe")
    calibration = Calibration(tau=tau, target_fpr=0.05, calib_fpr=0.0, calib_tpr=1.0, n_benign=4, n_harmful=4)
    save_calibration(calibration, folder / "data" / "calibration" / "calibration.json")
    return folder


@pytest.fixture
def tiny_run(tiny_llava_folder: Path, tmp_path: Path) -> Path:
    return write_tiny_run(tmp_path / "run", tiny_llava_folder)


def run_cli(*args: str) -> tuple[int, list[dict], str]:
    out = io.StringIO()
    status = main(list(args), stdout=out)
    text = out.getvalue()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return status, records, text


def test_export_then_check_with_the_guard_decides_as_the_run(tiny_run: Path, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    status, from_run, _ = run_cli("check", "--run", str(tiny_run), "--input", str(requests))
    assert status == 0 and len(from_run) == len(TEXTS)

    bundle = tmp_path / "guards" / "default"
    status, _, said = run_cli("export", "--run", str(tiny_run), "--out", str(bundle))
    assert status == 0 and f"load it with --guard {bundle}" in said
    assert set(verify_bundle(bundle)) >= {"detector/probe.safetensors", "settings.json", "model.json"}

    status, from_guard, _ = run_cli("check", "--guard", str(bundle), "--input", str(requests))
    assert status == 0
    for run_record, guard_record in zip(from_run, from_guard, strict=True):
        assert guard_record["action"] == run_record["action"] and guard_record["tau"] == run_record["tau"]
        assert guard_record["score"] == pytest.approx(run_record["score"], abs=1e-6)
    # The model folder can be named too; one request on the command line gives the same record.
    status, [named], _ = run_cli(
        "check", "--guard", str(bundle), "--model", str(json_model_path(bundle)), "--text", TEXTS[0]
    )
    assert status == 0 and named["score"] == pytest.approx(from_run[0]["score"], abs=1e-6)


def json_model_path(bundle: Path) -> Path:
    return (bundle / json.loads((bundle / "model.json").read_text())["path"]).resolve()


def test_the_saved_guards_limits_are_checked_before_the_model_loads(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    assert main(["export", "--run", str(tiny_run), "--out", str(bundle)], stdout=io.StringIO()) == 0

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the guard must not load for a request over the limits")

    monkeypatch.setattr("lsi_guard_app.cli.load_guard", no_loading)
    assert main(["check", "--guard", str(bundle), "--text", "x" * 101]) == 2
    assert "max_request_chars" in capsys.readouterr().err


def test_run_and_guard_together_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command, rest in (("check", ["--text", "hi"]), ("generate", ["--text", "hi"]), ("serve", []), ("demo", [])):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--run", str(tmp_path), "--guard", str(tmp_path), *rest])
        assert exit_info.value.code == 2
        assert "argument --guard: not allowed with argument --run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app.main(["--run", str(tmp_path), "--guard", str(tmp_path)])
    assert "not allowed with argument --run" in capsys.readouterr().err


def test_model_without_guard_and_a_missing_guard_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--model", str(tmp_path), "--text", "hi"]) == 2
    assert "--model goes with --guard" in capsys.readouterr().err
    assert main(["check", "--guard", str(tmp_path / "nowhere"), "--text", "hi"]) == 2
    assert "no such folder, and not a Hugging Face Hub repository id" in capsys.readouterr().err
    assert main(["check", "--guard", str(tmp_path), "--text", "hi"]) == 2
    assert "no guard.json, so not a saved guard" in capsys.readouterr().err


def test_export_without_a_finished_run_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "bundle")]) == 2
    assert "no params file" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()


def test_serve_reads_the_policy_of_the_saved_guard(tmp_path: Path) -> None:
    _, bundle = saved_guard(tmp_path)  # policy lsi_then_ecso
    upstream = ["--mode", "upstream", "--upstream", "http://h/v1"]
    args = build_parser().parse_args(["serve", "--guard", str(bundle), *upstream])
    with pytest.raises(ServeOptionError, match="needs the lsi policy, not 'lsi_then_ecso'"):
        check_options(args, environ={})
    args = build_parser().parse_args(["serve", "--guard", str(bundle), "--policy", "lsi", *upstream])
    keys = check_options(args, environ={})
    assert keys.source is not None and keys.source.bundle == bundle and keys.source.run is None


def test_the_demo_serves_a_saved_guard(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    assert main(["export", "--run", str(tiny_run), "--out", str(bundle)], stdout=io.StringIO()) == 0
    served = []

    def stop_at_once(demo: object, host: str, port: int) -> str:
        served.append(demo)
        raise KeyboardInterrupt  # as Ctrl+C would, once the guard has loaded and the page is built

    monkeypatch.setattr(app, "serve", stop_at_once)
    assert app.main(["--guard", str(bundle)]) == 0 and len(served) == 1
    assert app.main(["--guard", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--guard takes the folder" in err and "Traceback" not in err
    assert (bundle / MANIFEST).is_file()
