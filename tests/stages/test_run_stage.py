"""The stage runner (stages.run_stage): expected failures are one line and exit 1; bugs keep their traceback."""

from __future__ import annotations

import logging

import pytest

from pipeline.detect.store_schema import StoreError
from pipeline.errors import LSIGuardError
from stages import run_stage


class OddInput(LSIGuardError, ValueError):
    """An expected failure defined outside the library, as a new module would."""


@pytest.mark.parametrize("error", [OddInput("rows.jsonl:3: bad label"), StoreError("store.zarr: not complete")])
def test_an_expected_error_is_one_line_and_exit_1(error: LSIGuardError, capsys: pytest.CaptureFixture[str]) -> None:
    def main() -> None:
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_stage(main)
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {error}\n" and captured.out == ""


def test_a_bug_propagates_with_its_traceback() -> None:
    def main() -> None:
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError, match="a bug"):
        run_stage(main)


def test_a_stage_that_succeeds_returns_and_its_output_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    def main() -> None:
        logging.getLogger("stages.example").info("progress goes to the log")
        print("summary")

    run_stage(main)
    assert capsys.readouterr().out == "summary\n"
