"""The report's "Run" section: the run record of the page, and of each comparison it shows."""

from __future__ import annotations

from pipeline.evaluate.report import ReportInputs, render_report, run_rows
from pipeline.run_record import build_run_record

RECORD = {
    "project_version": "0.1.0",
    "git_commit": "5859f35",
    "git_dirty": True,
    "python": "3.11.7",
    "libraries": {"torch": "2.13.0", "transformers": "5.1.0"},
    "device": "cuda:0",
    "model_name": "SmolVLM",
    "model_revision": "abc123",
    "wall_time_s": 4.5,
}


def test_run_rows_name_code_libraries_device_model_and_time() -> None:
    rows = dict(run_rows(RECORD))
    assert rows["code"] == "lsi-guard 0.1.0, commit 5859f35, with uncommitted changes"
    assert rows["Python and libraries"] == "Python 3.11.7, torch 2.13.0, transformers 5.1.0"
    assert (rows["device"], rows["model"], rows["wall time"]) == ("cuda:0", "SmolVLM (revision abc123)", "4.5 s")
    assert dict(run_rows({**RECORD, "git_dirty": None}))["code"] == "lsi-guard 0.1.0, commit 5859f35"
    assert run_rows({}) == []


def test_the_page_shows_a_run_section_only_with_a_record() -> None:
    page = render_report(ReportInputs(title="t", params_text="", facts=[], run=RECORD))
    assert '<h2 id="run">Run</h2>' in page and 'href="#run"' in page
    assert "commit 5859f35, with uncommitted changes" in page and "SmolVLM (revision abc123)" in page
    assert 'id="run"' not in render_report(ReportInputs(title="t", params_text="", facts=[]))
    live = build_run_record(model_name="m<b>", model_revision="r", device="cpu", wall_time_s=1.0)
    assert "m&lt;b&gt; (revision r)" in render_report(ReportInputs(title="t", params_text="", facts=[], run=live))
