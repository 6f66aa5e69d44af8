"""``lsi-guard``: the guard of a finished run, from the command line.

    lsi-guard check    --text "How do I pick a lock?" [--image photo.png]
    lsi-guard generate --text "..." [--image ...]                 # refuse, answer, or ECSO
    lsi-guard generate --input requests.jsonl --output results.jsonl
    lsi-guard demo                                                # the local web demo
    lsi-guard serve [--mode upstream --upstream http://127.0.0.1:8000/v1]  # OpenAI-compatible guarding proxy
    lsi-guard verify-store data/activations/store.zarr            # check every chunk of a store
    lsi-guard export --run . --out guards/default                 # the run's guard as one shareable folder
    lsi-guard eval --suite demo [--limit N] [--output DIR] [--lm-eval-json PATH]  # a comparison suite
    lsi-guard --version                                           # also: python -m lsi_guard_app ...

Every command reads the run in ``--run`` (default: the current folder, after ``bash scripts/run.sh``)
and takes the ``guard`` section of its ``params.yaml``, which ``--policy``, ``--on-error``,
``--ecso-margin`` and ``--max-new-tokens`` override. ``check``, ``generate``, ``demo`` and ``serve``
take ``--guard DIR`` instead: a saved guard (``lsi-guard export``, ``Guard.save_pretrained``) or a
Hugging Face Hub id, on the model folder it records or the one ``--model`` names
(:mod:`lsi_guard_app.sources`). Results are JSON lines: one per request, the input's own fields
first, then the decision (and for ``generate`` the response, ECSO's steps and timings). A failed
check follows ``on_error`` and is logged and recorded; a request whose answer itself fails is
recorded with its error, and the command then exits 1.

Before the model loads, every request is checked against the run's ``limits`` params section
(text characters, image pixels from the header; images must exist and decode) and ``--output``
must be a file in an existing, writable folder; any problem exits 2 naming the input (``--text``,
``--image``, ``file:line``) or the option, with nothing written. A request the model's tokeniser
finds over ``limits.max_request_tokens`` is recorded with its error (no decision) and the
command exits 1. Input files are UTF-8, with or without a byte-order mark.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from lsi_guard_app.eval_command import add_eval_parser, eval_command
from lsi_guard_app.serve.command import add_serve_arguments, serve_command
from lsi_guard_app.sources import add_source_arguments, guard_source, load_guard
from pipeline.config import GUARD_POLICIES, LimitsConfig
from pipeline.data.limits import RequestTooLarge, check_image_size, check_request_text
from pipeline.errors import LSIGuardError
from pipeline.extras import check_installed
from pipeline.images import ImageError, load_image
from pipeline.io import json_lines, jsonl_text, write_text_atomic
from pipeline.version import __version__

if TYPE_CHECKING:
    from pipeline.defend.guard import Guard

# The guard (torch, transformers, the model code) is imported only once the inputs and --output
# have passed their checks: its seconds of import would otherwise come before every refusal.

logger = logging.getLogger(__name__)

# Input keys the guard reads; any other keys are carried through to the output unchanged.
TEXT, IMAGE = "text", "image"
RESULT_KEYS = frozenset({"action", "refused", "score", "tau", "reason", "error", "response", "ecso", "seconds", "line"})
CHECK_BATCH = 8


class InputError(LSIGuardError, ValueError):
    """A request file that cannot be read as requests; the message names the file and line."""


@dataclass(frozen=True, kw_only=True)
class InputRequest:
    """One request to guard, with the fields it came with (echoed into its result)."""

    text: str
    image: Path | None
    fields: dict[str, Any]
    line: int | None = None
    where: str = "--text"  # how errors name the request: "--text", or "file:line"


def read_requests(path: Path) -> list[InputRequest]:
    """Every request in a JSON-lines file, validated before any model work starts.

    Each non-blank line is an object with a non-empty string ``text`` and optionally ``image``,
    a path (relative paths are read from the file's folder) or null. Other keys are kept. The
    file is read by :func:`pipeline.io.json_lines`, as the pipeline reads its sources: a leading
    byte-order mark is skipped, only ``\n`` (or ``\r\n``) ends a line, and a lone surrogate is refused.
    """
    requests: list[InputRequest] = []
    for number, where, record in json_lines(Path(path), InputError, "requests file"):
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text = record.get(TEXT)
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: '{TEXT}' must be a non-empty string, got {text!r}")
        image = record.get(IMAGE)
        if image is not None and (not isinstance(image, str) or not image):
            raise InputError(f"{where}: '{IMAGE}' must be a file path or null, got {image!r}")
        clashes = sorted(RESULT_KEYS & set(record))
        if clashes:
            raise InputError(f"{where}: keys {clashes} are result fields; rename them in the input")
        image_path = None if image is None else _relative_to(Path(image), Path(path).parent)
        requests.append(InputRequest(text=text, image=image_path, fields=record, line=number, where=where))
    if not requests:
        raise InputError(f"{path}: no requests (every line is blank)")
    return requests


def _relative_to(path: Path, folder: Path) -> Path:
    return path if path.is_absolute() else folder / path


def _check_encodable(what: str, value: object) -> None:
    """Refuse text that cannot be written back as UTF-8 (a lone surrogate such as ``"\\ud800"``)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        raise InputError(f"{what} holds a lone surrogate {bad!r}, which is not text; fix the input") from None


def admit_requests(requests: Sequence[InputRequest], limits: LimitsConfig) -> None:
    """Check every request against ``limits`` and every image for being readable, before the model loads.

    Raises :class:`InputError` naming the request (``--text``, ``--image`` or ``file:line``).
    """
    for request in requests:
        try:
            check_request_text(request.text, limits)
        except RequestTooLarge as exc:
            raise InputError(f"{request.where}: {exc}") from None
        if request.image is None:
            continue
        where = "--image" if request.line is None else request.where
        try:
            check_image_size(request.image, limits)  # the header first: an oversized image is never decoded
            load_image(request.image, limits.max_image_pixels)
        except ImageError as exc:  # ImageTooLarge included
            raise InputError(f"{where}: {exc}") from None


def check_output(output: Path) -> None:
    """Refuse an ``--output`` that could not be written, before any model work (so no results are lost)."""
    if output.is_dir():
        raise InputError(f"--output {output}: is a folder; give the path of a results file")
    folder = output.absolute().parent
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"--output {output}: the folder {folder} {state}; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--output {output}: the folder {folder} is not writable")
    if output.exists() and not output.is_file():
        raise InputError(f"--output {output}: is not a regular file")


def _results(guard: Guard, requests: Sequence[InputRequest], command: str) -> Iterator[dict[str, Any]]:
    """One result record per request, in order; an answer that fails is recorded, not raised."""
    from pipeline.defend.admission import REQUEST_LIMIT_ERRORS, make_request
    from pipeline.defend.decisions import decision_record, response_record

    if command == "check":
        for start in range(0, len(requests), CHECK_BATCH):
            chunk = requests[start : start + CHECK_BATCH]
            try:
                decisions = guard.check_many([make_request(r.image, r.text) for r in chunk])
            except REQUEST_LIMIT_ERRORS:
                # One request over a limit (found when tokenised): the rest of the chunk still gets checked.
                yield from (_check_alone(guard, request) for request in chunk)
                continue
            for request, decision in zip(chunk, decisions, strict=True):
                yield {**request.fields, **decision_record(decision)}
        return
    for request in requests:
        try:
            record = response_record(guard.generate(request.image, request.text))
        except Exception as exc:  # noqa: BLE001 - the run goes on; the error is recorded and counted
            record = {**_failure(request, exc), "response": None}
        yield {**request.fields, **record}


def _check_alone(guard: Guard, request: InputRequest) -> dict[str, Any]:
    """One request's check record; a request over a limit is recorded with its error."""
    from pipeline.defend.admission import REQUEST_LIMIT_ERRORS
    from pipeline.defend.decisions import decision_record

    try:
        return {**request.fields, **decision_record(guard.check(request.image, request.text))}
    except REQUEST_LIMIT_ERRORS as exc:
        return {**request.fields, **_failure(request, exc)}


def _failure(request: InputRequest, exc: BaseException) -> dict[str, Any]:
    """The record of a request the guard could not finish: no action, and the error."""
    logger.error("request %s failed: %s", request.where, exc)
    return {"action": None, "refused": None, "error": f"{type(exc).__name__}: {exc}"}


def summary_line(records: Sequence[dict[str, Any]]) -> str:
    """How many requests were refused, answered, sent to ECSO, or failed."""
    counts = {key: 0 for key in ("refuse", "answer", "ecso")}
    for record in records:
        if record.get("action") in counts:
            counts[record["action"]] += 1
    failed = sum(1 for r in records if r.get("action") is None)
    check_errors = sum(1 for r in records if r.get("action") is not None and r.get("error"))
    noun = "request" if len(records) == 1 else "requests"
    return (
        f"{len(records)} {noun}: {counts['refuse']} refused, {counts['answer']} answered, "
        f"{counts['ecso']} sent to ECSO; {check_errors} check errors (on_error applied), {failed} failed"
    )


def _write(records: Sequence[dict[str, Any]], output: Path | None, stream: TextIO) -> None:
    text = jsonl_text(records)
    if output is None:
        stream.write(text)
    else:
        # Atomic: an existing results file is replaced only by a complete one.
        write_text_atomic(output, text)


def build_parser() -> argparse.ArgumentParser:
    """The ``lsi-guard`` argument parser."""
    parser = argparse.ArgumentParser(prog="lsi-guard", description="Guard a vision-language model with LSI and ECSO.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("check", "decide refuse / answer / ECSO without answering"),
        ("generate", "refuse, answer, or run ECSO, as the policy decides"),
    ):
        sub = commands.add_parser(name, help=help_text)
        source = sub.add_mutually_exclusive_group(required=True)
        source.add_argument("--text", help="one request's text")
        source.add_argument("--input", type=Path, help="a JSON-lines file of requests ({'text': ..., 'image': ...})")
        sub.add_argument("--image", type=Path, help="the image for --text (optional)")
        sub.add_argument("--output", type=Path, help="write JSON-lines results here (default: standard output)")
        _common(sub)
        if name == "generate":
            sub.add_argument("--max-new-tokens", type=int, help="answer length (default: guard.max_new_tokens)")
    demo = commands.add_parser("demo", help="start the local web demo")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    demo.add_argument("--port", type=int, default=7860)
    _common(demo)
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server: the guard in front of a model")
    add_serve_arguments(serve)
    _common(serve)
    _add_verify_store(commands)
    _add_export(commands)
    add_eval_parser(commands)
    return parser


def _common(sub: argparse.ArgumentParser) -> None:
    add_source_arguments(sub)
    sub.add_argument("--policy", choices=GUARD_POLICIES, help="override guard.policy")
    sub.add_argument("--on-error", choices=("refuse", "answer"), help="override guard.on_error")
    sub.add_argument("--ecso-margin", type=float, help="override guard.ecso_margin")


def main(argv: list[str] | None = None, stdout: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 some request failed, 2 bad input or set-up)."""
    args = build_parser().parse_args(argv)
    stdout = stdout or sys.stdout
    if args.command == "verify-store":
        return verify_store_command(args.path, stdout)
    if args.command == "export":
        return export_command(args.run, args.out, stdout)
    logging.basicConfig(level=logging.WARNING, format="lsi-guard: %(levelname)s: %(message)s", stream=sys.stderr)
    if args.command == "eval":
        return eval_command(args, stdout)
    if args.command == "serve":
        return serve_command(args)
    try:
        if args.command == "demo":
            # Imported only for the demo: gradio takes seconds to import and check/generate never need it.
            check_installed("gradio", "demo", "lsi-guard demo")
            from lsi_guard_app.web import launch

            launch(args.run, host=args.host, port=args.port, policy=args.policy, guard=args.guard, model=args.model)
            return 0
        if args.image is not None and args.text is None:
            raise InputError("--image goes with --text; in an --input file give each request's image in its line")
        if args.output is not None and args.input is not None and args.output.resolve() == args.input.resolve():
            raise InputError(f"{args.output}: the output would overwrite the input")
        if args.text is not None:
            if not args.text.strip():
                raise InputError("--text is empty")
            _check_encodable("--text", args.text)
            requests = [
                InputRequest(
                    text=args.text, image=args.image, fields={TEXT: args.text, IMAGE: _image_field(args.image)}
                )
            ]
        else:
            requests = read_requests(args.input)
        source = guard_source(args.run, args.guard, args.model)
        admit_requests(requests, source.limits)
        if args.output is not None:
            check_output(args.output)
        guard = load_guard(
            source,
            policy=args.policy,
            on_error=args.on_error,
            ecso_margin=args.ecso_margin,
            max_new_tokens=getattr(args, "max_new_tokens", None),
        )
    except LSIGuardError as exc:
        print(f"lsi-guard: error: {exc}", file=sys.stderr)
        return 2
    progress = tqdm(total=len(requests), desc=args.command, unit="req", disable=len(requests) == 1, file=sys.stderr)
    records = []
    for record in _results(guard, requests, args.command):
        records.append(record)
        progress.update(1)
    progress.close()
    _write(records, args.output, stdout)
    print(f"lsi-guard: {summary_line(records)}", file=sys.stderr)
    return 1 if any(record.get("action") is None for record in records) else 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "export", help="save a finished run's guard as one folder that --guard and Guard.from_pretrained load"
    )
    sub.add_argument("--run", type=Path, default=Path("."), help="the project folder of a finished run (default: .)")
    sub.add_argument("--out", type=Path, required=True, help="the folder to write (an earlier saved guard is replaced)")


def export_command(run: Path, out: Path, stdout: TextIO) -> int:
    """export: the run's detector, tau, settings and model identity in ``out``; 0 when written, 2 on a problem.

    The model's identity comes from its folder's metadata: no weights load.
    """
    # Imported here: the detector brings torch, which the other commands' input checks never wait for.
    from pipeline.defend.pretrained import bundle_from_run, write_bundle

    try:
        contents = bundle_from_run(run)
        write_bundle(contents, out)
    except LSIGuardError as exc:
        print(f"lsi-guard: error: {exc}", file=sys.stderr)
        return 2
    info = contents.info
    print(
        f"{out}: saved the guard of {run.resolve()} ({contents.detector.describe()}, tau={contents.settings.tau:.4f}; "
        f"{contents.model.kind} model {info.name!r}, revision {info.revision}); load it with --guard {out}",
        file=stdout,
    )
    return 0


def _add_verify_store(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "verify-store", help="check every chunk, shard index and attribute of an activation store (reads only)"
    )
    sub.add_argument("path", type=Path, help="the store folder, e.g. data/activations/store.zarr")


def verify_store_command(path: Path, stdout: TextIO) -> int:
    """verify-store: one line per problem, then a total; exit 0 if sound, 1 on problems, 2 if no store."""
    # Imported here: zarr and dask are only needed by this command.
    from pipeline.detect.store_verify import verify_store

    try:
        problems = verify_store(path, progress=True)
    except LSIGuardError as exc:
        print(f"lsi-guard: error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"{path}: {problem}", file=stdout)
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        print(f"{path}: {len(problems)} {noun} found; fetch the store again or rerun the 'extract' stage", file=stdout)
        return 1
    print(f"{path}: no problems: every chunk, shard index and attribute checked", file=stdout)
    return 0


def _image_field(image: Path | None) -> str | None:
    return None if image is None else str(image)


if __name__ == "__main__":
    sys.exit(main())
