"""Resuming a killed comparison run: finished batches in a ``.partial.jsonl`` file, checked by fingerprint.

The file's first line is a header holding the fingerprint of everything that decides a row
(settings, probe, tau, the examples drawn); every later line is one comparison row. Each batch is
appended in one write and synced, so a kill loses at most the batch being written, and a torn
last line is dropped on reading. A file left under another setup is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.errors import LSIGuardError
from pipeline.evaluate.comparison import ComparisonRow
from pipeline.io import jsonl_lines, jsonl_text, write_text_atomic


class ResumeMismatch(LSIGuardError, ValueError):
    """A partial comparison file written under another setup."""


def fingerprint(params: Params, suite: str, example_keys: Sequence[str], tau: float, probe_sha256: str) -> str:
    """sha256 of everything that decides a comparison row: settings, probe, tau, the examples drawn."""
    compare = asdict(params.compare)
    compare.pop("examples_in_report")  # report-only
    compare["suites"] = [s for s in compare["suites"] if s[0] == suite]
    blob = json.dumps(
        {
            "compare": compare,
            "model": asdict(params.model),
            "prompts": asdict(params.prompts),
            "guard": asdict(params.guard),
            "ecso": asdict(params.ecso),
            "tau": tau,
            "probe": probe_sha256,
            "examples": list(example_keys),
            # A partial file from code whose rows have other fields cannot be resumed.
            "row_fields": [f.name for f in fields(ComparisonRow)],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_partial(path: Path, expected: str) -> list[dict[str, Any]]:
    """The rows a killed run left in ``path`` (none if absent), after checking its setup matches.

    A last line cut off mid-write is dropped, so is the batch it belonged to (rows are written a
    whole batch per write, so that batch is recomputed).
    """
    if not path.is_file():
        return []
    lines = jsonl_lines(path.read_text(encoding="utf-8"))
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if not isinstance(header, dict) or header.get("fingerprint") != expected:
        raise ResumeMismatch(
            f"{path}: left by a comparison run under a different setup (params, probe, tau or examples); "
            "delete it to start over"
        )
    records: list[dict[str, Any]] = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the torn tail of a killed write; everything after it is incomplete too
    return records


def start_partial(path: Path, expected: str, suite: str, records: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``path`` as its header and the rows kept, in one atomic step (a kill here loses nothing)."""
    header = json.dumps({"fingerprint": expected, "suite": suite}) + "\n"
    write_text_atomic(path, header + jsonl_text(records))


def append_rows(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append one batch's rows in a single write and sync it, so a kill loses at most this batch."""
    with path.open("a", encoding="utf-8") as file:
        file.write(jsonl_text(records))
        file.flush()
        os.fsync(file.fileno())


def done_examples(records: Sequence[dict[str, Any]], defences: Sequence[str]) -> set[tuple[str, str]]:
    """(benchmark, example_id) of every example that has a row for every defence."""
    seen: dict[tuple[str, str], set[str]] = {}
    for record in records:
        seen.setdefault((record["benchmark"], record["example_id"]), set()).add(record["defence"])
    return {key for key, have in seen.items() if have >= set(defences)}


def finished_rows(records: Sequence[dict[str, Any]], defences: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of examples that every defence finished; a half-done example is recomputed whole."""
    finished = done_examples(records, defences)
    return [r for r in records if (r["benchmark"], r["example_id"]) in finished]
