"""The demo surface of the bad-input matrix, through the function gradio calls (:class:`app.Responder`):
each bad request gets the error panel naming what is wrong, and the files the demo wrote earlier
(the example image, an earlier request's map) are byte-identical after."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import pytest

from lsi_guard_app.web import app
from tests.clocks import ExpiredClock
from tests.defend.test_guard import FakeAdapter, hand_set_guard
from tests.snapshots import folder_digests

MEGABYTE_TEXT = "x" * 1_000_000


@dataclass(frozen=True)
class Case:
    """One press of the button (or one HTTP API call): its inputs and what the error panel must say.

    ``{huge}``, ``{corrupt}`` and ``{dir}`` in ``image`` and ``message`` become the 20,000 x 20,000 PNG,
    the PNG with a corrupt pixel stream and the case's folder; ``upload`` wraps the image the way
    gradio's file payload does. ``expired`` runs the request with its deadline already passed.
    """

    id: str
    text: str | None
    message: str
    image: str | None = None
    policy: object = "lsi"
    upload: bool = False
    expired: bool = False


CASES = [
    Case(
        "unknown-policy", "hi", "unknown policy 'nonsense'; choose one of ecso, lsi, lsi_then_ecso", policy="nonsense"
    ),
    Case("no-policy", "hi", "unknown policy None; choose one of ecso, lsi, lsi_then_ecso", policy=None),
    Case("empty-text", "   ", "the request text is empty"),
    Case("no-text", None, "the request text is empty"),
    Case(
        "megabyte-text",
        MEGABYTE_TEXT,
        "the request is too long: request text is 1,000,000 characters, over the limit of 32,768 "
        "(limits.max_request_chars)",
    ),
    Case("huge-image", "hi", "the uploaded image cannot be used: {huge}: 20000x20000", image="{huge}"),
    Case("huge-upload", "hi", "{huge}: 20000x20000 = 400,000,000 pixels", image="{huge}", upload=True),
    Case("missing-image", "hi", "{dir}/gone.png: image file not found", image="{dir}/gone.png"),
    Case("corrupt-image", "hi", "{corrupt}: not a readable image", image="{corrupt}", upload=True),
    Case("past-the-deadline", "hi", "the request took longer than limits.request_timeout_s = 120 s", expired=True),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_demo_input_shows_the_error_panel_and_leaves_earlier_files(
    case: Case, tmp_path: Path, huge_png: Path, corrupt_png: Path
) -> None:
    adapter = FakeAdapter()
    guard = hand_set_guard(adapter)
    work = tmp_path / "work"
    work.mkdir()
    app.example_rows(work)  # what the demo writes at start-up
    (work / "0001-tokens.png").write_bytes(b"an earlier request's map")
    clock = ExpiredClock() if case.expired else None
    respond = app.Responder(guard=guard, work=work, attribution_steps=4, **({"clock": clock} if clock else {}))

    def fill(text: str) -> str:
        return text.replace("{huge}", str(huge_png)).replace("{corrupt}", str(corrupt_png)).replace("{dir}", str(work))

    image: object = None if case.image is None else fill(case.image)
    if case.upload:
        image = {"path": image, "orig_name": Path(str(image)).name}
    before = folder_digests(work)
    panel, answer, *_ = respond(image, case.text, case.policy, True)
    panel = html.unescape(str(panel))
    assert "Cannot check this request" in panel and answer == ""
    assert fill(case.message) in panel
    assert adapter.generate_calls == []  # nothing was answered
    assert folder_digests(work) == before
