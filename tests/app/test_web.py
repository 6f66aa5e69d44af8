"""The web demo: its pure helpers, its command line, and the page itself driven in headless Chromium.

The guard is a tiny random embedded model with a fixed OCR reader and a tiny random probe; tau is
set between the probe's own scores of two requests, so the page must show one refused and the
other answered by the real decision path.
"""

from __future__ import annotations

import html
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from lsi_guard_app.web import app, handling, render
from pipeline.config import ContrastivePrompts, ECSOConfig, GuardConfig, LimitsConfig
from pipeline.data.drawing import render_typography
from pipeline.defend.decisions import GuardDecision, GuardedResponse
from pipeline.defend.ecso import ECSORecord
from pipeline.defend.guard import Guard
from pipeline.images import save_png
from pipeline.models.ocr import OCRLine
from pipeline.testing.tiny_embedded import tiny_embedded, tiny_llama, tiny_probe
from tests.clocks import ExpiredClock
from tests.paths import PROJECT_ROOT

ARTIFACTS = PROJECT_ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000


def require_chromium() -> ModuleType:
    """Playwright's sync API, once Debian's chromium is known to be there; skip without it (fail under CI)."""
    if not CHROMIUM.is_file():
        reason = f"{CHROMIUM} is missing; install Debian's chromium: bash scripts/browser.sh (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return pytest.importorskip("playwright.sync_api")


def typography_line(text: str) -> OCRLine:
    """The OCR stand-in's reading of every image: the typography example's first line."""
    return OCRLine(text=text, box=[[24.0, 24.0], [736.0, 24.0], [736.0, 72.0], [24.0, 72.0]], score=0.99)


@dataclass(frozen=True)
class TinySetup:
    """The guard under test and what it does to the two requests, computed directly."""

    guard: Guard
    refused_text: str
    answered_text: str
    answered_response: str
    ecso_record: ECSORecord


def tiny_guard(tokenizer: PreTrainedTokenizerBase, tau: float) -> Guard:
    """A random 3-layer Llama behind a random probe whose scores of the two requests differ clearly."""
    model = tiny_llama(tokenizer, seed=1)
    probe, meta = tiny_probe(seed=4)
    with torch.no_grad():
        # A steeper probe spreads the two scores apart; the decision path itself is untouched.
        probe.probe.weight.mul_(200.0)
        probe.probe.bias.zero_()
    adapter = tiny_embedded(model, tokenizer, (typography_line(app.TYPOGRAPHY_TEXT),))
    return Guard(
        adapter=adapter,
        detector=probe,
        meta=meta,
        tau=tau,
        prompts=ContrastivePrompts(),
        # Tau sits between two whole requests' scores; a random probe scores a sentence of them (or a
        # sentence the tests append) anywhere, so these app tests score the whole request, as ends does.
        config=GuardConfig(max_new_tokens=12, policy="lsi", views="ends"),
        ecso_config=ECSOConfig(max_new_tokens=12, judge_max_new_tokens=4),
    )


@pytest.fixture(scope="module")
def setup(gguf_tokenizer: PreTrainedTokenizerBase) -> TinySetup:
    scout = tiny_guard(gguf_tokenizer, tau=0.5)
    scores = {text: scout.check(None, text).score for text in (app.HARMFUL_EXAMPLE, app.BENIGN_EXAMPLE)}
    assert all(score is not None for score in scores.values())
    high, low = sorted(scores, key=lambda text: scores[text], reverse=True)
    assert scores[high] - scores[low] > 1e-3, f"the probe cannot tell the requests apart: {scores}"
    guard = tiny_guard(gguf_tokenizer, tau=(scores[high] + scores[low]) / 2)
    assert guard.check(None, high).refused and not guard.check(None, low).refused
    answered = guard.generate(None, low)
    assert answered.decision.action == "answer" and answered.response.strip(), "the answer must be visible text"
    record = guard.with_config(policy="ecso").generate(None, low).ecso
    assert record is not None
    return TinySetup(guard, high, low, answered.response, record)


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "typography.png"
    save_png(render_typography("hello world"), path)
    return path


@pytest.fixture
def broken_picture(tmp_path: Path) -> Path:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a picture")
    return path


# -- pure helpers ---------------------------------------------------------------------------


def response_with(action: str, score: float | None = 0.7, ecso: ECSORecord | None = None, **kw: str) -> GuardedResponse:
    decision = GuardDecision(
        score=score, tau=0.5, action=action, reason=kw.get("reason", "because"), error=kw.get("error")
    )
    return GuardedResponse(
        decision=decision,
        response="the answer",
        ecso=ecso,
        seconds={"prefix": 0.1, "check": 0.05, "answer": 0.6, "total": 0.75},
    )


# ECSO's records: (answer, the harm check's raw text, judged harmful, caption, final answer, changed).
HARMFUL_RECORD, SAFE_RECORD, HARMFUL_NO_IMAGE = (
    ECSORecord(answer=a, harm_check_raw=raw, judged_harmful=h, caption=c, final_answer=f, changed=changed)
    for a, raw, h, c, f, changed in (
        ("bad answer", "Yes, it is.", True, "a photo of wires", "I cannot help.", True),
        ("fine answer", "No.", False, None, "fine answer", False),
        ("bad answer", "yes", True, None, "I cannot help.", True),
    )
)


def test_headline_names_the_action_and_ecso_outcome() -> None:
    assert render.headline(response_with("refuse")) == "Refused"
    assert render.headline(response_with("answer", 0.2)) == "Answered"
    assert render.headline(response_with("ecso", None, HARMFUL_RECORD)).startswith("Sent to ECSO: judged harmful")
    assert render.headline(response_with("ecso", None, SAFE_RECORD)) == "Sent to ECSO: judged safe, first answer kept"


def test_score_summary_compares_with_tau_or_says_why_there_is_none() -> None:
    assert (
        render.score_summary(GuardDecision(score=0.73456, tau=0.5, action="refuse", reason="r"))
        == "LSI refusal score 0.7346 > tau 0.5000"
    )
    assert (
        render.score_summary(GuardDecision(score=0.5, tau=0.5, action="answer", reason="r"))
        == "LSI refusal score 0.5000 <= tau 0.5000"
    )
    assert "ECSO policy" in render.score_summary(GuardDecision(score=None, tau=0.5, action="ecso", reason="r"))
    assert "check failed" in render.score_summary(
        GuardDecision(score=None, tau=0.5, action="refuse", reason="r", error="ImageError: x")
    )


def test_timing_summary_lists_the_parts_and_the_total() -> None:
    seconds = {"prefix": 0.1, "check": 0.05, "answer": 0.6, "total": 0.75}
    assert render.timing_summary(seconds) == "0.75 s in all (prefix 0.10 s, check 0.05 s, answer 0.60 s)"
    assert render.timing_summary({"total": 2.0}, explain_seconds=1.234) == "2.00 s in all; attribution 1.23 s"


def test_score_bar_fills_to_the_score_and_marks_tau() -> None:
    above = render.score_bar_html(0.8, 0.5)
    assert "width:80.00%" in above and "#dc2626" in above and "left:calc(50.00% - 1px)" in above
    below = render.score_bar_html(0.25, 0.6)
    assert "width:25.00%" in below and "#16a34a" in below and "#dc2626" not in below
    assert "ECSO band" not in below
    banded = render.score_bar_html(0.55, 0.5, margin=0.1)
    assert 'title="ECSO band"' in banded and "left:40.00%;width:20.00%" in banded
    assert "width:" in render.score_bar_html(None, 0.5) and "#16a34a" not in render.score_bar_html(None, 0.5)


def test_decision_html_shows_everything_and_escapes_model_text() -> None:
    page = render.decision_html(response_with("refuse", reason="<script>alert(1)</script>", error="Boom: <b>"))
    assert "Refused" in page and "LSI refusal score 0.7000 &gt; tau 0.5000" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "The check failed" in page and "Boom: &lt;b&gt;" in page
    assert "0.75 s in all" in page and "score-bar" in page
    assert "score-bar" not in render.decision_html(response_with("ecso", None, SAFE_RECORD))


def test_ecso_steps_show_every_step_and_why_one_was_skipped() -> None:
    titles = [title for title, _ in render.ecso_steps(HARMFUL_RECORD)]
    assert titles[1] == "2. Harm check: harmful" and titles[3].startswith("4. Final answer, from the caption")
    bodies = [body for _, body in render.ecso_steps(HARMFUL_RECORD)]
    assert bodies == ["bad answer", "model's verdict: Yes, it is.", "a photo of wires", "I cannot help."]
    safe = render.ecso_steps(SAFE_RECORD)
    assert safe[1][0] == "2. Harm check: not harmful"
    assert "judged not harmful" in safe[2][1] and "the first answer, kept" in safe[3][1]
    assert "no image" in render.ecso_steps(HARMFUL_NO_IMAGE)[2][1]
    page = render.ecso_html(
        ECSORecord(
            answer="<i>x</i>",
            harm_check_raw="no",
            judged_harmful=False,
            caption=None,
            final_answer="<i>x</i>",
            changed=False,
        )
    )
    assert "&lt;i&gt;x&lt;/i&gt;" in page and "left the answer unchanged" in page


def test_input_problem_names_what_is_wrong(picture: Path, broken_picture: Path, tmp_path: Path) -> None:
    assert "empty" in (handling.input_problem(None, "   ") or "")
    assert "empty" in (handling.input_problem(None, None) or "")
    assert "not found" in (handling.input_problem(tmp_path / "missing.png", "hi") or "")
    problem = handling.input_problem(broken_picture, "hi") or ""
    assert "cannot be used" in problem and "broken.png" in problem
    assert handling.input_problem(picture, "hi") is None
    assert handling.input_problem(None, "hi") is None


def test_short_title_names_the_request_and_cuts_long_ones() -> None:
    assert render.short_title("make a bomb") == "request: make a bomb"
    cut = render.short_title("x" * 100)
    assert cut == "request: " + "x" * 67 + "..."
    assert render.short_title("y" * 70) == "request: " + "y" * 70


def test_uploaded_path_reads_gradio_payloads() -> None:
    assert (
        handling.uploaded_path({"path": "/tmp/gradio/abc/cat.png", "orig_name": "cat.png"}) == "/tmp/gradio/abc/cat.png"
    )
    assert handling.uploaded_path("/tmp/x.png") == "/tmp/x.png"
    assert (
        handling.uploaded_path(None) is None
        and handling.uploaded_path({"path": None}) is None
        and handling.uploaded_path("") is None
    )


def test_policy_guards_share_one_model(setup: TinySetup) -> None:
    guards = handling.policy_guards(setup.guard)
    assert set(guards) == {"lsi", "ecso", "lsi_then_ecso"}
    assert guards["lsi"] is setup.guard
    for policy, guard in guards.items():
        assert guard.config.policy == policy and guard.adapter is setup.guard.adapter and guard.tau == setup.guard.tau


def test_run_request_reports_bad_input_and_draws_maps(
    setup: TinySetup, picture: Path, broken_picture: Path, tmp_path: Path
) -> None:
    empty = handling.run_request(setup.guard, None, "", False, 4, tmp_path, "a")
    assert empty.response is None and "empty" in (empty.error or "")
    broken = handling.run_request(setup.guard, str(broken_picture), "hi", False, 4, tmp_path, "b")
    assert broken.response is None and "broken.png" in (broken.error or "")
    result = handling.run_request(setup.guard, str(picture), setup.answered_text, True, 4, tmp_path, "c")
    assert result.error is None and result.explain_note is None and result.response is not None
    assert result.token_map == tmp_path / "c-tokens.png" and result.image_map == tmp_path / "c-image.png"
    for path in (result.token_map, result.image_map):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 200
    text_only = handling.run_request(setup.guard, None, setup.refused_text, True, 4, tmp_path, "d")
    assert text_only.response is not None and text_only.response.decision.refused
    assert text_only.token_map is not None and text_only.image_map is None


def test_run_request_attributes_the_target_asked_for(
    setup: TinySetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explain = setup.guard.explain
    targets: list[str] = []

    def recording(*args: object, target: str = "detector", **kwargs: object) -> object:
        targets.append(target)
        return explain(*args, target=target, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(setup.guard, "explain", recording)
    for name, chosen in (("e", None), ("f", "contrast")):
        extra = {} if chosen is None else {"target": chosen}
        result = handling.run_request(setup.guard, None, setup.answered_text, True, 4, tmp_path, name, **extra)
        assert result.token_map is not None and result.explain_note is None
    assert targets == ["detector", "contrast"]


def test_a_request_past_its_deadline_is_an_error_naming_the_limit(setup: TinySetup, tmp_path: Path) -> None:
    result = handling.run_request(setup.guard, None, setup.answered_text, False, 4, tmp_path, "t", clock=ExpiredClock())
    assert result.response is None
    assert "took longer than limits.request_timeout_s = 120 s" in (result.error or "")
    assert "raise limits.request_timeout_s in params.yaml" in (result.error or "")
    # The hooks are gone: the next request runs and is answered as before.
    again = handling.run_request(setup.guard, None, setup.answered_text, False, 4, tmp_path, "u")
    assert again.response is not None and again.response.response == setup.answered_response


def test_maps_past_the_deadline_leave_the_decision_standing(
    setup: TinySetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered = {"done": False}

    def late() -> float:
        # The deadline is set and the answer runs at time 0; everything after the answer is an hour later.
        return 3600.0 if answered["done"] else 0.0

    generate = setup.guard.generate

    def generate_then_late(*args: object, **kwargs: object) -> object:
        response = generate(*args, **kwargs)  # type: ignore[arg-type]
        answered["done"] = True
        return response

    monkeypatch.setattr(setup.guard, "generate", generate_then_late)
    result = handling.run_request(setup.guard, None, setup.answered_text, True, 4, tmp_path, "v", clock=late)
    assert result.response is not None and result.response.response == setup.answered_response
    assert result.token_map is None and "took longer than limits.request_timeout_s" in (result.explain_note or "")
    assert not (tmp_path / "v-tokens.png").exists()


def test_the_page_handler_refuses_an_unknown_policy_and_limits(setup: TinySetup, tmp_path: Path) -> None:
    guard = setup.guard.with_config()
    guard.limits = LimitsConfig(max_request_chars=20)
    respond = app.Responder(guard=guard, work=tmp_path)
    panel = html.unescape(str(respond(None, setup.answered_text, "nonsense", False)[0]))
    assert "Cannot check this request" in panel
    assert "unknown policy 'nonsense'; choose one of ecso, lsi, lsi_then_ecso" in panel
    panel = html.unescape(str(respond(None, "x" * 21, "lsi", False)[0]))
    assert "21 characters, over the limit of 20 (limits.max_request_chars)" in panel


def test_the_queue_is_bounded_and_runs_one_request_at_a_time(setup: TinySetup, tmp_path: Path) -> None:
    demo = app.build_demo(setup.guard, attribution_steps=4, work=tmp_path)
    assert demo._queue.max_size == app.QUEUE_SIZE  # more waiting requests are turned away at once
    model_events = [fn for fn in demo.fns.values() if isinstance(fn.fn, app.Responder)]
    assert [fn.api_name for fn in model_events] == ["respond", "respond_1"]
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in model_events} == {("model", 1)}


def test_an_unknown_policy_through_the_http_api_is_an_error(setup: TinySetup, tmp_path: Path) -> None:
    client_module = pytest.importorskip("gradio_client")
    demo = app.build_demo(setup.guard, attribution_steps=4, work=tmp_path)
    url = app.serve(demo, "127.0.0.1", free_port())
    try:
        client = client_module.Client(url, verbose=False, download_files=False)
        panel = client.predict(None, setup.answered_text, "nonsense", False, api_name="/respond")[0]
    finally:
        demo.close()
    assert "unknown policy &#x27;nonsense&#x27;; choose one of ecso, lsi, lsi_then_ecso" in panel


# -- command line ---------------------------------------------------------------------------


def test_main_without_a_run_exits_2_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_serving(*args: object, **kwargs: object) -> str:
        raise AssertionError("the demo must not start without a run")

    monkeypatch.setattr(app, "serve", no_serving)
    assert app.main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no params file" in err and "bash scripts/run.sh" in err and "Traceback" not in err

    (tmp_path / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    assert app.main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no finished run" in err and "bash scripts/run.sh" in err

    with pytest.raises(SystemExit) as exit_info:
        app.launch(tmp_path / "nowhere")
    assert exit_info.value.code == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_demo_and_removes_its_temp_folder(tmp_path: Path, signum: int) -> None:
    from tests.defend.test_guard import write_run

    run = tmp_path / "run"
    write_run(run)
    temp = tmp_path / "tmp"
    temp.mkdir()
    port = free_port()
    log = tmp_path / "demo.log"
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(PROJECT_ROOT)}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.app.demo_worker", str(run), str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Serving once the example image is in its work folder and the port answers.
        for _ in range(1200):
            assert process.poll() is None, log.read_text()
            started = list(temp.glob(f"{app.WORK_PREFIX}*/typography_example.png"))
            if started and _port_open(port):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the demo did not start: {log.read_text()}")
        process.send_signal(signum)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert list(temp.glob(f"{app.WORK_PREFIX}*")) == [], log.read_text()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- the page in a browser ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Browser:
    """A page on the running demo, and every request it made to somewhere other than the demo."""

    page: object
    url: str
    outside: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def browser(setup: TinySetup) -> Iterator[Browser]:
    sync_api = require_chromium()
    demo = app.build_demo(setup.guard, attribution_steps=4)
    url = app.serve(demo, "127.0.0.1", free_port())
    try:
        with sync_api.sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = chromium.new_page(viewport={"width": 1280, "height": 900})
                session = Browser(page, url)
                local = url.rstrip("/")

                def note(request: object) -> None:
                    address = request.url  # type: ignore[attr-defined]
                    if not address.startswith((local, "data:", "blob:")):
                        session.outside.append(address)

                page.on("request", note)
                page.goto(url)
                yield session
            finally:
                chromium.close()
    finally:
        demo.close()


def reset(session: Browser, policy: str = "lsi") -> None:
    """No image, Explain off, ``policy`` chosen: whatever an earlier test left behind."""
    page = session.page
    remove = page.locator("#image-input button[aria-label='Remove Image']")  # type: ignore[attr-defined]
    if remove.count():
        remove.click()
    page.locator("#explain input[type=checkbox]").uncheck()  # type: ignore[attr-defined]
    page.get_by_text(app.POLICY_LABELS[policy]).click()  # type: ignore[attr-defined]


def ask(session: Browser, text: str) -> None:
    page = session.page
    page.locator("#request textarea").fill(text)  # type: ignore[attr-defined]
    page.locator("#submit").click()  # type: ignore[attr-defined]


def screenshot(session: Browser, name: str) -> None:
    """A full-page screenshot under test-artifacts/, once the page's fonts have loaded."""
    ARTIFACTS.mkdir(exist_ok=True)
    session.page.evaluate("document.fonts.ready.then(() => true)")  # type: ignore[attr-defined]
    session.page.screenshot(path=str(ARTIFACTS / name), full_page=True)  # type: ignore[attr-defined]


@pytest.mark.browser
def test_page_refuses_then_answers(browser: Browser, setup: TinySetup) -> None:
    from playwright.sync_api import expect

    page = browser.page
    reset(browser)
    decision = page.locator("#decision")  # type: ignore[attr-defined]
    ask(browser, setup.refused_text)
    expect(decision).to_contain_text("Refused", timeout=WAIT_MS)
    expect(decision).to_contain_text(f"> tau {setup.guard.tau:.4f}")
    expect(page.locator("#response textarea")).to_have_value(setup.guard.config.refusal_message)  # type: ignore[attr-defined]

    ask(browser, setup.answered_text)
    expect(decision).to_contain_text("Answered", timeout=WAIT_MS)
    expect(decision).to_contain_text(f"<= tau {setup.guard.tau:.4f}")
    expect(page.locator("#response textarea")).to_have_value(setup.answered_response, timeout=WAIT_MS)  # type: ignore[attr-defined]
    expect(page.locator("#ecso-steps")).to_be_hidden()  # type: ignore[attr-defined]
    screenshot(browser, "web_demo.png")
    assert browser.outside == []


@pytest.mark.browser
def test_page_shows_errors_as_messages(browser: Browser, broken_picture: Path) -> None:
    from playwright.sync_api import expect

    page = browser.page
    reset(browser)
    decision = page.locator("#decision")  # type: ignore[attr-defined]
    ask(browser, "   ")
    expect(decision).to_contain_text("Cannot check this request", timeout=WAIT_MS)
    expect(decision).to_contain_text("the request text is empty")

    page.locator("#image-input input[type=file]").set_input_files(str(broken_picture))  # type: ignore[attr-defined]
    ask(browser, "What is in this picture?")
    expect(decision).to_contain_text("the uploaded image cannot be used", timeout=WAIT_MS)
    expect(decision).to_contain_text("not a readable image")
    page.locator("#image-input button[aria-label='Remove Image']").click()  # type: ignore[attr-defined]
    expect(page.locator("#image-input img")).to_have_count(0)  # type: ignore[attr-defined]
    assert browser.outside == []


@pytest.mark.browser
def test_page_explains_a_typography_example(browser: Browser) -> None:
    from playwright.sync_api import expect

    page = browser.page
    reset(browser)
    page.get_by_text("Typography image (harmful text in the picture)").click()  # type: ignore[attr-defined]
    expect(page.locator("#request textarea")).to_have_value(app.TYPOGRAPHY_REQUEST)  # type: ignore[attr-defined]
    page.locator("#explain input[type=checkbox]").check()  # type: ignore[attr-defined]
    page.locator("#submit").click()  # type: ignore[attr-defined]
    for map_id in ("#token-map img", "#image-map img"):
        image = page.locator(map_id)  # type: ignore[attr-defined]
        expect(image).to_be_visible(timeout=WAIT_MS)
        assert image.evaluate("img => img.complete && img.naturalWidth > 200")
    expect(page.locator("#decision")).to_contain_text("attribution")  # type: ignore[attr-defined]
    screenshot(browser, "web_demo_explain.png")
    page.locator("#explain input[type=checkbox]").uncheck()  # type: ignore[attr-defined]
    assert browser.outside == []


@pytest.mark.browser
def test_page_shows_ecso_steps(browser: Browser, setup: TinySetup) -> None:
    from playwright.sync_api import expect

    page = browser.page
    reset(browser, "ecso")
    # The example row sets the image back to none as well as the text: the record was computed without one.
    label = "Benign request" if setup.answered_text == app.BENIGN_EXAMPLE else "Harmful request"
    page.get_by_text(label, exact=True).click()  # type: ignore[attr-defined]
    expect(page.locator("#request textarea")).to_have_value(setup.answered_text)  # type: ignore[attr-defined]
    page.locator("#submit").click()  # type: ignore[attr-defined]
    expect(page.locator("#decision")).to_contain_text("Sent to ECSO", timeout=WAIT_MS)  # type: ignore[attr-defined]
    steps = page.locator("#ecso-steps")  # type: ignore[attr-defined]
    expect(steps).to_be_visible(timeout=WAIT_MS)
    for title, _ in render.ecso_steps(setup.ecso_record):
        expect(steps).to_contain_text(title)
    expect(steps).to_contain_text(setup.ecso_record.answer.strip())
    expect(page.locator("#response textarea")).to_have_value(setup.ecso_record.final_answer)  # type: ignore[attr-defined]
    screenshot(browser, "web_demo_ecso.png")
    assert browser.outside == []
