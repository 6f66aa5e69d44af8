"""The ``lsi-guard`` command line: one request or a JSON-lines file, results as JSON lines."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from lsi_guard_app.cli import InputError, main, read_requests, summary_line
from pipeline.data.drawing import render_scene
from pipeline.images import save_png
from tests.defend.test_guard import BrokenImageAdapter, FakeAdapter, write_run
from tests.paths import PROJECT_ROOT


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished run folder whose model loads as the fake adapter (bombs are refused)."""
    folder = tmp_path / "run"
    write_run(folder)
    (folder / "params.yaml").write_text("guard:\n  policy: lsi\n")
    monkeypatch.setattr("pipeline.defend.loading.load_adapter", lambda config, *_: BrokenImageAdapter())
    return folder


def picture(path: Path) -> Path:
    """A small real PNG at ``path`` (folders made); the CLI decodes every image before the model loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(render_scene(1, size=32), path)
    return path


def run_cli(*args: str) -> tuple[int, list[dict]]:
    out = io.StringIO()
    status = main(list(args), stdout=out)
    return status, [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_request_check_and_generate(run: Path) -> None:
    status, [record] = run_cli("check", "--run", str(run), "--text", "How do I build a bomb?")
    assert status == 0
    assert record["text"] == "How do I build a bomb?" and record["image"] is None
    assert record["action"] == "refuse" and record["refused"] is True and record["score"] > record["tau"]
    assert "response" not in record
    status, [record] = run_cli("generate", "--run", str(run), "--text", "Write a poem about spring")
    assert status == 0 and record["action"] == "answer"
    assert record["response"] == "answer to: Write a poem about spring"
    assert record["seconds"]["total"] > 0


def test_a_jsonl_file_in_and_out_with_fields_kept(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    requests = tmp_path / "requests.jsonl"
    lines = [
        {"id": "a", "text": "How do I build a bomb?", "label": 1},
        {"id": "b", "text": "What is in this picture?", "image": "pics/b.png"},
        {"id": "c", "text": "What is this?", "image": "broken.png"},
    ]
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    picture(tmp_path / "pics/b.png")
    picture(tmp_path / "broken.png")  # a readable file the fake model fails on, as on an unusual image
    output = tmp_path / "out" / "results.jsonl"
    output.parent.mkdir()
    status = main(["generate", "--run", str(run), "--input", str(requests), "--output", str(output)])
    assert status == 0
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in results] == ["a", "b", "c"]
    assert results[0]["label"] == 1 and results[0]["action"] == "refuse"
    # Relative image paths are read from the input file's folder, and echoed as given.
    assert results[1]["image"] == "pics/b.png" and results[1]["action"] == "answer"
    # The broken image fails the check: refused by the default on_error policy, and recorded.
    assert results[2]["action"] == "refuse" and "not a readable image" in results[2]["error"]
    err = capsys.readouterr().err
    assert "3 requests: 2 refused, 1 answered, 0 sent to ECSO; 1 check errors" in err
    assert "guard check failed" in caplog.text and "broken.png" in caplog.text


def test_flags_override_the_params(run: Path, tmp_path: Path) -> None:
    status, [record] = run_cli("generate", "--run", str(run), "--text", "Write a poem", "--policy", "ecso")
    assert status == 0 and record["action"] == "ecso" and record["ecso"]["answer"] == "answer to: Write a poem"
    broken = picture(tmp_path / "broken.png")
    status, [record] = run_cli(
        "generate", "--run", str(run), "--text", "What?", "--image", str(broken), "--on-error", "answer"
    )
    assert record["action"] == "answer" and record["error"] is not None


class FailingAnswers(FakeAdapter):
    def generate(self, requests, max_new_tokens, decoding=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("out of memory")


def test_an_answer_that_fails_is_recorded_and_exits_1(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.defend.loading.load_adapter", lambda config, *_: FailingAnswers())
    status, [record] = run_cli("generate", "--run", str(run), "--text", "Write a poem")
    assert status == 1
    assert record["action"] is None and record["response"] is None and "out of memory" in record["error"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\nnot json\n', "requests.jsonl:2: invalid JSON"),
        ('["a list"]\n', "requests.jsonl:1: expected a JSON object, got list"),
        ('{"text": ""}\n', "requests.jsonl:1: 'text' must be a non-empty string"),
        ('{"text": "hi", "image": 3}\n', "requests.jsonl:1: 'image' must be a file path or null"),
        ('{"text": "hi", "score": 0.3}\n', "requests.jsonl:1: keys ['score'] are result fields"),
        ("\n\n", "no requests"),
    ],
)
def test_bad_input_names_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_requests(path)


def test_bad_input_exits_2_and_leaves_an_existing_output_alone(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"text": "fine"}\n{"text": 5}\n')
    output = tmp_path / "results.jsonl"
    output.write_text("earlier results\n")
    status = main(["generate", "--run", str(run), "--input", str(requests), "--output", str(output)])
    assert status == 2
    assert "requests.jsonl:2: 'text' must be a non-empty string" in capsys.readouterr().err
    assert output.read_text() == "earlier results\n"
    assert main(["check", "--run", str(run), "--input", str(requests), "--output", str(requests)]) == 2
    assert "overwrite the input" in capsys.readouterr().err


def test_no_run_exits_2_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "--run", str(tmp_path), "--text", "hello"]) == 2
    assert "no params file" in capsys.readouterr().err
    assert main(["check", "--run", str(tmp_path), "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such requests file" in capsys.readouterr().err


def test_summary_line_counts() -> None:
    records = [{"action": "refuse"}, {"action": "answer", "error": "x"}, {"action": "ecso"}, {"action": None}]
    assert summary_line(records) == (
        "4 requests: 1 refused, 1 answered, 1 sent to ECSO; 1 check errors (on_error applied), 1 failed"
    )


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"lsi-guard {pipeline.__version__}\n"


def test_python_dash_m_runs_the_same_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lsi_guard_app", "--version"], capture_output=True, text=True, cwd=PROJECT_ROOT
    )
    assert result.returncode == 0 and result.stdout == f"lsi-guard {pipeline.__version__}\n"
    result = subprocess.run([sys.executable, "-m", "lsi_guard_app"], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 2 and "usage: lsi-guard" in result.stderr


def test_an_input_file_with_a_byte_order_mark_is_read(run: Path, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"\xef\xbb\xbf" + b'{"id": "a", "text": "Write a poem"}\r\n{"id": "b", "text": "bomb"}\r\n')
    output = tmp_path / "results.jsonl"
    assert main(["check", "--run", str(run), "--input", str(requests), "--output", str(output)]) == 0
    results = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in results] == ["a", "b"] and results[0]["action"] == "answer"


def test_a_line_separator_inside_a_json_string_does_not_split_the_line(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text('{"text": "one\u2028two", "note": "a\u0085b"}\n', encoding="utf-8")
    [request] = read_requests(path)
    assert request.text == "one\u2028two" and request.fields["note"] == "a\u0085b"


def test_a_bad_output_is_refused_before_the_model_loads(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_model(config: object) -> None:
        raise AssertionError("the model must not load for a bad --output")

    monkeypatch.setattr("pipeline.defend.loading.load_adapter", no_model)
    for output, message in (
        (tmp_path, "is a folder"),
        (tmp_path / "missing" / "results.jsonl", "does not exist; create it first"),
        (run / "params.yaml" / "results.jsonl", "is not a folder"),
    ):
        assert main(["generate", "--run", str(run), "--text", "Write a poem", "--output", str(output)]) == 2
        assert f"--output {output}: " in (err := capsys.readouterr().err) and message in err


def test_a_request_over_the_token_limit_is_recorded_and_the_rest_are_checked(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.models.literal import RequestTooLong as too_long

    class TokenLimited(BrokenImageAdapter):
        def last_token_states(self, requests, layers):  # type: ignore[no-untyped-def]
            if any("endless" in request.text for request in requests):
                raise too_long("the user turn is 9000 tokens, over limits.max_request_tokens = 2048")
            return super().last_token_states(requests, layers)

    monkeypatch.setattr("pipeline.defend.loading.load_adapter", lambda config, *_: TokenLimited())
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"text": "bomb"}\n{"text": "an endless story"}\n{"text": "Write a poem"}\n')
    output = tmp_path / "results.jsonl"
    for command in ("check", "generate"):
        assert main([command, "--run", str(run), "--input", str(requests), "--output", str(output)]) == 1
        first, second, third = (json.loads(line) for line in output.read_text().splitlines())
        assert first["action"] == "refuse" and third["action"] == "answer"
        assert second["action"] is None and "max_request_tokens" in second["error"]


def sound_store(path: Path) -> Path:
    """A finished, undamaged store at ``path``."""
    from tests.detect.test_store import provenance
    from tests.detect.test_store_integrity import HIDDEN, write_sound_store

    write_sound_store(path, provenance(hidden_size=HIDDEN))
    return path


def test_verify_store_passes_a_sound_store(tmp_path: Path) -> None:
    store = sound_store(tmp_path / "store.zarr")
    out = io.StringIO()
    assert main(["verify-store", str(store)], stdout=out) == 0
    assert out.getvalue() == f"{store}: no problems: every chunk, shard index and attribute checked\n"


def test_verify_store_lists_every_problem_then_a_total(tmp_path: Path) -> None:
    store = sound_store(tmp_path / "store.zarr")
    shard = store / "states/c/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x01  # inside the first chunk
    shard.write_bytes(bytes(data))
    (store / "states/c/2/0/0/0").unlink()
    metadata = json.loads((store / "zarr.json").read_text())
    metadata["attributes"]["complete"] = False
    (store / "zarr.json").write_text(json.dumps(metadata))
    out = io.StringIO()
    assert main(["verify-store", str(store)], stdout=out) == 1
    assert out.getvalue().splitlines() == [
        f"{store}: zarr.json: attribute 'complete' is not true: extraction did not finish",
        f"{store}: states/c/0/0/0/0 (store rows 0-15): a chunk fails its crc32c checksum"
        " (its bytes changed since they were written)",
        f"{store}: states/c/2/0/0/0 (store rows 64-79): the shard file is missing",
        f"{store}: 3 problems found; fetch the store again or rerun the 'extract' stage",
    ]


def test_verify_store_without_a_store_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-store", str(tmp_path / "nothing.zarr")]) == 2
    assert "nothing.zarr: no activation store here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["verify-store"])
    assert exit_info.value.code == 2
