"""The CLI surface of the bad-input matrix: each bad input exits 2 before the model loads, names the
input (``--text``, ``--image``, ``file:line`` or the option) and leaves earlier results byte-identical."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lsi_guard_app.cli import main
from tests.defend.test_guard import write_run
from tests.snapshots import folder_digests

MEGABYTE_TEXT = "x" * 1_000_000


@dataclass(frozen=True)
class Case:
    """One bad command line: its arguments, the files it needs, and what the error must say.

    ``{dir}``, ``{huge}`` and ``{corrupt}`` in ``args``, ``files`` and ``message`` become the case's
    folder, the 20,000 x 20,000 PNG and the PNG with a corrupt pixel stream. ``--run`` is added,
    and ``--output {dir}/results.jsonl`` unless the case gives its own ``--output``.
    """

    id: str
    args: list[str]
    message: str
    files: dict[str, str] = field(default_factory=dict)


CASES = [
    Case("megabyte-text", ["check", "--text", MEGABYTE_TEXT], "--text: request text is 1,000,000 characters"),
    Case(
        "megabyte-text-in-file",
        ["generate", "--input", "{dir}/requests.jsonl"],
        "requests.jsonl:2: request text is 1,000,000 characters, over the limit of 32,768 (limits.max_request_chars)",
        {"requests.jsonl": '{"text": "fine"}\n{"text": "' + MEGABYTE_TEXT + '"}\n'},
    ),
    Case("huge-image", ["check", "--text", "hi", "--image", "{huge}"], "--image: {huge}: 20000x20000"),
    Case(
        "huge-image-in-file",
        ["check", "--input", "{dir}/requests.jsonl"],
        "requests.jsonl:1: {huge}: 20000x20000 = 400,000,000 pixels",
        {"requests.jsonl": '{"text": "hi", "image": "{huge}"}\n'},
    ),
    Case(
        "missing-image",
        ["generate", "--text", "hi", "--image", "{dir}/missing.png"],
        "--image: {dir}/missing.png: image file not found",
    ),
    Case(
        "corrupt-image-in-file",
        ["generate", "--input", "{dir}/requests.jsonl"],
        "requests.jsonl:1: {corrupt}: not a readable image",
        {"requests.jsonl": '{"text": "hi", "image": "{corrupt}"}\n'},
    ),
    Case(
        "output-is-a-folder",
        ["check", "--text", "hi", "--output", "{dir}/results"],
        "--output {dir}/results: is a folder",
        {"results/keep.txt": "kept"},
    ),
    Case(
        "output-in-a-missing-folder",
        ["generate", "--text", "hi", "--output", "{dir}/nowhere/results.jsonl"],
        "--output {dir}/nowhere/results.jsonl: the folder {dir}/nowhere does not exist",
    ),
    Case("unknown-policy", ["check", "--text", "hi", "--policy", "nonsense"], "--policy: invalid choice: 'nonsense'"),
    Case("empty-text", ["check", "--text", "   "], "--text is empty"),
    Case(
        "invalid-json-line",
        ["check", "--input", "{dir}/requests.jsonl"],
        "requests.jsonl:3: invalid JSON",
        {"requests.jsonl": '{"text": "a"}\n\n{"text": "b"\n'},
    ),
    Case(
        "lone-surrogate-in-file",
        ["generate", "--input", "{dir}/requests.jsonl"],
        "requests.jsonl:2: field 'note' holds a lone surrogate",
        {"requests.jsonl": '{"text": "a"}\n{"text": "b", "note": "\\ud800"}\n'},
    ),
    Case("missing-input-file", ["check", "--input", "{dir}/absent.jsonl"], "{dir}/absent.jsonl: no such requests file"),
    Case("input-is-a-folder", ["check", "--input", "{dir}/inputs"], "{dir}/inputs: is a folder", {"inputs/k": "kept"}),
]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished run whose model must never load: every case fails before model work."""

    def no_model(config: object) -> None:
        raise AssertionError("the model loaded for a bad input")

    folder = tmp_path / "run"
    write_run(folder)
    monkeypatch.setattr("pipeline.defend.loading.load_adapter", no_model)
    return folder


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_cli_input_exits_2_naming_it_and_leaves_earlier_results(
    case: Case, run: Path, tmp_path: Path, huge_png: Path, corrupt_png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "case"
    folder.mkdir()

    def fill(text: str) -> str:
        return (
            text.replace("{dir}", str(folder)).replace("{huge}", str(huge_png)).replace("{corrupt}", str(corrupt_png))
        )

    (folder / "results.jsonl").write_text('{"text": "earlier", "action": "refuse"}\n')
    for name, content in case.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(fill(content), encoding="utf-8")
    args = [fill(arg) for arg in case.args] + ["--run", str(run)]
    if "--output" not in args:
        args += ["--output", str(folder / "results.jsonl")]
    before = folder_digests(folder)
    try:
        status = main(args)
    except SystemExit as exit_info:  # argparse refuses bad options itself
        status = exit_info.code
    assert status == 2
    assert fill(case.message) in capsys.readouterr().err
    assert folder_digests(folder) == before
