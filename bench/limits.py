"""Oversized requests on every surface: how fast they are refused, and with how much memory.

For each surface that takes requests, three cases:

- **baseline**: a normal request (a short text, no image), with the model where the surface needs
  it, so the refusals have something to be compared with;
- **1 MB text**: a request text of 1,000,000 characters (``limits.max_request_chars`` is 32,768);
- **20k x 20k PNG**: a short text with a 20,000 x 20,000 PNG (400 megapixels, against
  ``limits.max_image_pixels`` = 40,000,000). The PNG is a genuine, decodable one-colour image,
  streamed row by row into a temporary folder (one bit per pixel, all zeros, so it compresses to
  a few tens of kilobytes and is never held as pixels while it is written).

Surfaces:

- ``prepare``: :func:`pipeline.data.index.build_index` (what ``stages/prepare.py`` runs) on a
  temporary source folder. The baseline source is a copy of ``data/demo/everyday.jsonl`` (60 rows,
  12 typography renders); an oversized case is the same file with one oversized row appended, so
  the whole source is read before the bad row is reached.
- ``cli``: ``python -m lsi_guard_app check --run <run> ...`` as a subprocess, timed from process
  start to exit (interpreter start and imports included). The 1 MB text goes through ``--input``
  (a one-line JSON-lines file), since argv is bounded.
- ``api``: :meth:`Guard.check` on ``Guard.from_run(<run>)``.
- ``demo``: the function the web page calls (:class:`lsi_guard_app.web.app.Responder`), built as
  the tests build it, over the same real guard; its baseline answers (``Guard.generate``).

Measured per case: wall seconds until the refusal (or the answer), peak memory, whether the
request was refused, the error's first line and whether it names the limit (the params key). For
the CLI the peak is the child's maximum RSS (through ``/usr/bin/time``; see :func:`cli_case`). In
process it is the ``tracemalloc`` peak of the call (Python allocations only: tensors allocated by
torch are not traced), and the resident-set peak above the RSS at the call's start, read from
``VmHWM`` after resetting it through ``/proc/self/clear_refs`` (Linux); where that reset is not
allowed, the RSS growth from start to end of the call (psutil) is reported instead. Each in-process
case is run once timed without tracing and once more under ``tracemalloc``; every surface's
baseline is run once before anything is timed, so lazy initialisation (OCR engine, fonts,
kernels) is not charged to the first case. The acceptance target is a refusal within 2 s.

    python bench/limits.py                 # the finished default run in this project folder
    python bench/limits.py --run /path/to/project

Needs a finished default run (``bash scripts/run.sh``). Prints a table and writes
``bench/results/limits.json``.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path("bench/results")
TARGET_SECONDS = 2.0
HUGE_SIDE = 20_000
MEGABYTE = 1_000_000
BASELINE_TEXT = "Write a haiku about rain."
IMAGE_TEXT = "Describe this picture."
BASELINE_SOURCE = Path("data/demo/everyday.jsonl")
CASES = ("baseline", "1 MB text", "20k x 20k PNG")
# The params key each oversized case is over: a clear refusal names it.
LIMIT_KEYS = {"1 MB text": "limits.max_request_chars", "20k x 20k PNG": "limits.max_image_pixels"}
MIB = 1024 * 1024


@dataclass
class Outcome:
    """What one call gave back: refused (with the error's text) or not."""

    refused: bool
    message: str = ""


@dataclass
class Measurement:
    """One surface and case: time, memory, and what the refusal said."""

    surface: str
    case: str
    seconds: float
    peak_mb: float
    rss_peak_mb: float | None
    refused: bool
    first_line: str
    names_limit: bool | None
    memory_note: str


# -- inputs -------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_huge_png(path: Path, side: int = HUGE_SIDE) -> None:
    """Write a valid ``side`` x ``side`` one-colour PNG, compressing one row at a time (never all pixels)."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte "none", then the packed pixels
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    )


def megabyte_text() -> str:
    """A 1,000,000-character request text: an ordinary sentence repeated."""
    sentence = "Please summarise the following meeting notes in three bullet points. "
    return (sentence * (MEGABYTE // len(sentence) + 1))[:MEGABYTE]


@dataclass(frozen=True)
class Inputs:
    """The files every surface's cases read, made once in a temporary folder."""

    folder: Path
    huge_png: Path
    megabyte_jsonl: Path  # one CLI input line with the 1 MB text
    text: str


def make_inputs(folder: Path) -> Inputs:
    """The 20k x 20k PNG and the 1 MB CLI input file under ``folder``."""
    huge = folder / "huge.png"
    write_huge_png(huge)
    text = megabyte_text()
    jsonl = folder / "megabyte.jsonl"
    jsonl.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    return Inputs(folder, huge, jsonl, text)


# -- memory -------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _current_rss_kib() -> int | None:
    """This process's resident set in KiB, through psutil when installed, else ``/proc``."""
    try:
        import psutil
    except ImportError:
        return _status_kib("VmRSS")
    return psutil.Process().memory_info().rss // 1024


def in_process(setup: Callable[[], Callable[[], Outcome]]) -> tuple[float, Outcome, float, float | None, str]:
    """Time a call from ``setup`` untraced, then a second one under tracemalloc for its memory.

    ``setup`` (not measured) prepares what the call reads and returns the call. Returns seconds,
    the timed call's outcome, the tracemalloc peak (MiB), the RSS peak above the start (MiB, or
    None when RSS cannot be read) and a note saying how that RSS figure was taken.
    """
    call = setup()
    started = time.perf_counter()
    outcome = call()
    seconds = time.perf_counter() - started

    call = setup()
    hwm_reset = _reset_peak_rss()
    rss_before = _current_rss_kib()
    tracemalloc.start()
    try:
        call()
        traced_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if hwm_reset:
        after, note = _status_kib("VmHWM"), "VmHWM after a clear_refs reset, minus RSS at start"
    else:
        after, note = _current_rss_kib(), "RSS at end minus RSS at start (peak RSS not resettable)"
    rss = None if after is None or rss_before is None else max(0, after - rss_before) / 1024
    return seconds, outcome, traced_peak / MIB, rss, note


# -- surfaces -----------------------------------------------------------------------------------


def refusal(exc: BaseException) -> Outcome:
    """A refusal carrying the exception's text."""
    return Outcome(True, f"{type(exc).__name__}: {exc}")


def prepare_call(inputs: Inputs, run: Path, case: str) -> Callable[[], Callable[[], Outcome]]:
    """Set-up of ``build_index`` on a fresh copy of the baseline source, with the case's row appended."""
    from pipeline.data.index import build_index
    from pipeline.defend.loading import run_params
    from pipeline.errors import LSIGuardError

    params = run_params(run)
    baseline = (run / BASELINE_SOURCE).read_text(encoding="utf-8")
    extra = {
        "baseline": None,
        "1 MB text": {
            "request_id": "big-1",
            "category": "other",
            "label": "benign",
            "text": inputs.text,
            "image": None,
        },
        "20k x 20k PNG": {
            "request_id": "big-2",
            "category": "other",
            "label": "benign",
            "text": IMAGE_TEXT,
            "image": inputs.huge_png.name,
        },
    }[case]

    def setup() -> Callable[[], Outcome]:
        # A fresh folder each time (removed with the temporary folder), so no run reuses another's output.
        folder = Path(tempfile.mkdtemp(prefix="prepare-", dir=inputs.folder))
        source = folder / "everyday.jsonl"
        lines = baseline if extra is None else baseline + json.dumps(extra) + "\n"
        source.write_text(lines, encoding="utf-8")
        if extra is not None and extra["image"] is not None:
            shutil.copyfile(inputs.huge_png, folder / inputs.huge_png.name)  # images must lie inside the source folder

        def call() -> Outcome:
            try:
                build_index([source], folder / "prepared", params.prepare, params.limits)
            except LSIGuardError as exc:
                return refusal(exc)
            return Outcome(False)

        return call

    return setup


def api_call(guard: object, inputs: Inputs, case: str) -> Callable[[], Callable[[], Outcome]]:
    """Set-up of ``Guard.check`` on the case's request (nothing to prepare)."""
    from pipeline.defend.admission import REQUEST_LIMIT_ERRORS

    image, text = {
        "baseline": (None, BASELINE_TEXT),
        "1 MB text": (None, inputs.text),
        "20k x 20k PNG": (inputs.huge_png, IMAGE_TEXT),
    }[case]

    def call() -> Outcome:
        try:
            guard.check(image, text)  # type: ignore[attr-defined]
        except REQUEST_LIMIT_ERRORS as exc:
            return refusal(exc)
        return Outcome(False)

    return lambda: call


def demo_call(
    responder: Callable[..., tuple[object, ...]], inputs: Inputs, case: str
) -> Callable[[], Callable[[], Outcome]]:
    """Set-up of one press of the demo's button with the case's request (an uploaded file payload for the image)."""
    image, text = {
        "baseline": (None, BASELINE_TEXT),
        "1 MB text": (None, inputs.text),
        "20k x 20k PNG": ({"path": str(inputs.huge_png), "orig_name": inputs.huge_png.name}, IMAGE_TEXT),
    }[case]

    def call() -> Outcome:
        panel = html.unescape(re.sub(r"<[^>]+>", "\n", str(responder(image, text, "lsi", False)[0])))
        lines = [line.strip() for line in panel.splitlines() if line.strip()]
        if lines and lines[0] == "Cannot check this request":
            return Outcome(True, "\n".join(lines[1:]))
        return Outcome(False)

    return lambda: call


TIME = Path("/usr/bin/time")


def cli_case(run: Path, inputs: Inputs, case: str) -> tuple[float, Outcome, float, str]:
    """``python -m lsi_guard_app check`` as a child: seconds from start to exit, outcome, max RSS (MiB), how taken.

    A forked child's ``ru_maxrss`` counts the parent's resident set at the fork (Linux keeps the
    high-water mark across ``exec``), so the child is started through ``/usr/bin/time``, a small
    process whose own child's peak it reports. Without it, ``os.wait4``'s rusage of the child is
    used, and the figure is at least this process's RSS when the child started.
    """
    source = {
        "baseline": ["--text", BASELINE_TEXT],
        "1 MB text": ["--input", str(inputs.megabyte_jsonl)],
        "20k x 20k PNG": ["--text", IMAGE_TEXT, "--image", str(inputs.huge_png)],
    }[case]
    command = [sys.executable, "-m", "lsi_guard_app", "check", "--run", str(run), *source]
    out, err, peak = inputs.folder / "cli.out", inputs.folder / "cli.err", inputs.folder / "cli.maxrss"
    timed = TIME.is_file()
    if timed:
        command = [str(TIME), "-f", "%M", "-o", str(peak), *command]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's so far
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr_text = err.read_text(encoding="utf-8", errors="replace")
    errors = [line for line in stderr_text.splitlines() if line.startswith("lsi-guard: error:")]
    if child.returncode == 2 and errors:
        outcome = Outcome(True, errors[0])
    elif child.returncode == 0:
        outcome = Outcome(False)
    else:
        raise RuntimeError(f"{' '.join(command)[:300]} ...: exit {child.returncode}\n{stderr_text[-2000:]}")
    if timed:
        # GNU time writes "Command exited with non-zero status N" before the figure when N != 0.
        max_rss_kib, note = int(peak.read_text().split()[-1]), "the child's max RSS (/usr/bin/time)"
    else:
        max_rss_kib, note = usage.ru_maxrss, "the child's max RSS (wait4; includes this process's RSS at fork)"
    return seconds, outcome, max_rss_kib / 1024, note


# -- main ---------------------------------------------------------------------------------------


def measurement(
    surface: str,
    case: str,
    seconds: float,
    outcome: Outcome,
    peak_mb: float,
    rss_peak_mb: float | None,
    memory_note: str,
) -> Measurement:
    """A table row; the first line of the error, and whether it names the case's limit."""
    key = LIMIT_KEYS.get(case)
    first_line = outcome.message.splitlines()[0] if outcome.message else ""
    names = None if key is None else key in outcome.message
    return Measurement(surface, case, seconds, peak_mb, rss_peak_mb, outcome.refused, first_line, names, memory_note)


def check_expectations(rows: list[Measurement]) -> list[str]:
    """What went wrong: a baseline refused, or an oversized case answered or not naming its limit."""
    problems = []
    for row in rows:
        if row.case == "baseline" and row.refused:
            problems.append(f"{row.surface}: the baseline request was refused ({row.first_line})")
        if row.case != "baseline" and not (row.refused and row.names_limit):
            problems.append(f"{row.surface} / {row.case}: not refused with an error naming {LIMIT_KEYS[row.case]}")
    return problems


def print_table(rows: list[Measurement]) -> None:
    """The results, one line per surface and case, with the oversized cases' ratio to the baseline."""
    baseline = {row.surface: row.seconds for row in rows if row.case == "baseline"}
    print(
        f"{'surface':<8} {'case':<14} {'seconds':>8} {'peak MB':>8} {'RSS+ MB':>8} "
        f"{'refused?':>8} {'x baseline':>10}  target: refused within {TARGET_SECONDS:g} s"
    )
    for row in rows:
        rss = "-" if row.rss_peak_mb is None else f"{row.rss_peak_mb:.1f}"
        if row.case == "baseline":
            ratio, verdict = "1.00", "(admitted)" if not row.refused else "(refused!)"
        else:
            ratio = f"{row.seconds / baseline[row.surface]:.3f}"
            ok = row.refused and row.names_limit and row.seconds <= TARGET_SECONDS
            verdict = "met" if ok else "MISSED"
        print(
            f"{row.surface:<8} {row.case:<14} {row.seconds:>8.3f} {row.peak_mb:>8.2f} {rss:>8} "
            f"{'yes' if row.refused else 'no':>8} {ratio:>10}  {verdict}"
        )
    print()
    print("peak MB / RSS+ MB, per surface:")
    notes = {row.surface: row.memory_note for row in rows}
    for surface, note in notes.items():
        if surface == "cli":
            print(f"  {surface:<8} peak = {note}")
        else:
            print(f"  {surface:<8} peak = tracemalloc peak (Python allocations only); RSS+ = {note}")
    print()
    print("errors (first line; [names the limit key?]):")
    for row in rows:
        if row.case != "baseline":
            print(f"  {row.surface:<8} {row.case:<14} [{'yes' if row.names_limit else 'NO'}] {row.first_line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("."), help="the project folder of a finished run")
    parser.add_argument("--out", type=Path, default=RESULTS / "limits.json")
    args = parser.parse_args()
    run = args.run.resolve()

    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="lsi-limits-") as tmp:
        started = time.perf_counter()
        inputs = make_inputs(Path(tmp))
        made = time.perf_counter() - started
        png_bytes = inputs.huge_png.stat().st_size
        print(
            f"inputs: {png_bytes:,}-byte {HUGE_SIDE}x{HUGE_SIDE} PNG and a "
            f"{len(inputs.text):,}-character text, made in {made:.1f} s"
        )

        # The CLI runs in children, so it goes first, before this process holds a model.
        for case in CASES:
            seconds, outcome, rss, note = cli_case(run, inputs, case)
            rows.append(measurement("cli", case, seconds, outcome, rss, None, note))

        # Imported only now: the CLI's children are measured before this process grows.
        import torch

        from lsi_guard_app.web import app
        from pipeline.defend.guard import Guard

        surfaces: list[tuple[str, Callable[[str], Callable[[], Callable[[], Outcome]]]]] = []
        surfaces.append(("prepare", lambda case: prepare_call(inputs, run, case)))
        guard = Guard.from_run(run)
        surfaces.append(("api", lambda case: api_call(guard, inputs, case)))
        work = Path(tmp) / "demo"
        work.mkdir()
        responder = app.Responder(guard=guard, work=work)
        surfaces.append(("demo", lambda case: demo_call(responder, inputs, case)))
        for _, make in surfaces:
            make("baseline")()()  # warm-up: lazy initialisation is not charged to any case
        for surface, make in surfaces:
            for case in CASES:
                seconds, outcome, traced, rss, note = in_process(make(case))
                rows.append(measurement(surface, case, seconds, outcome, traced, rss, note))

    print()
    print_table(rows)
    problems = check_expectations(rows)
    for problem in problems:
        print(f"PROBLEM: {problem}")

    summary = {
        "target_seconds": TARGET_SECONDS,
        "run": str(run),
        "limits": asdict(guard.limits),
        "model": guard.adapter.info.name,
        "huge_png": {"side": HUGE_SIDE, "bytes": png_bytes, "kind": "streamed valid PNG"},
        "megabyte_text_chars": len(inputs.text),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "max_rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "problems": problems,
        "rows": [asdict(row) for row in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
