"""Readers for public safety-benchmark files, turned into typed records.

Three formats, as laid out in a benchmark folder (see ``BuildConfig.benchmarks``)::

    MM-SafetyBench/processed_questions/NN-Scenario.json   {"<id>": {"Question": ..., "Key Phrase": ..., ...}}
    MM-SafetyBench/TinyVersion_ID_List.json               [{"Scenario": "NN-Scenario", "Sampled_ID_List": [ids]}]
    MM-Vet/mm-vet_metadata.json                           [{"id": "v1_N", "txt": question, ...}]
    alpaca-seed/seed_tasks.jsonl                          {"id", "name", "instruction", "instances": [{"input", ...}]}

Every MM-SafetyBench record is harmful; every MM-Vet question and alpaca seed task is benign.
Each reader takes the benchmark folder, the benchmark's own folder or its file, and raises
:class:`BenchmarkError` naming the file (and record) when something is missing or malformed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.sources import DatasetError
from pipeline.io import json_lines

MMSB_DIR = "MM-SafetyBench"
MMSB_QUESTIONS_DIR = "processed_questions"
MMSB_TINY_FILE = "TinyVersion_ID_List.json"
MMVET_DIR = "MM-Vet"
MMVET_FILE = "mm-vet_metadata.json"
ALPACA_DIR = "alpaca-seed"
ALPACA_FILE = "seed_tasks.jsonl"

MMVET_SOURCE = "mm-vet"
ALPACA_SOURCE = "alpaca"

# MM-SafetyBench field name -> SafetyBenchRecord attribute.
MMSB_FIELDS: dict[str, str] = {
    "Question": "question",
    "Key Phrase": "key_phrase",
    "Phrase Type": "phrase_type",
    "Rephrased Question": "rephrased_question",
}


class BenchmarkError(DatasetError):
    """A benchmark file that is missing or malformed, named by path (and record)."""


@dataclass(frozen=True, kw_only=True)
class SafetyBenchRecord:
    """One MM-SafetyBench question (always harmful).

    ``scenario`` is the file stem (``"01-Illegal_Activitiy"``), ``id`` the record's key in that
    file. ``rephrased_question`` is the text that goes with the TYPO image, which shows
    ``key_phrase`` typed on white; ``phrase_type`` is what the rephrasing calls the phrase
    ("activity", "product", ...).
    """

    scenario: str
    id: str
    question: str
    key_phrase: str
    phrase_type: str
    rephrased_question: str


@dataclass(frozen=True, kw_only=True)
class BenignQuestion:
    """One benign request from MM-Vet or the alpaca seed tasks.

    ``source`` is ``"mm-vet"`` or ``"alpaca"``; ``name`` is the alpaca task name
    (``"grocery_list"``), empty for MM-Vet.
    """

    source: str
    id: str
    text: str
    name: str = ""


def _locate(path: str | Path, subdir: str, filename: str) -> Path:
    """The benchmark file given the benchmarks folder, the benchmark's folder or the file itself."""
    path = Path(path)
    for candidate in (path / subdir / filename, path / filename, path):
        if candidate.is_file():
            return candidate
    raise BenchmarkError(f"{path}: no {subdir}/{filename} here (nor {filename}); check build.benchmarks")


def _load_json(path: Path) -> Any:
    """A parsed JSON file; unreadable or invalid files raise :class:`BenchmarkError`."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def _text_field(record: Any, key: str, where: str) -> str:
    """A string field that must be present and non-empty, stripped."""
    if not isinstance(record, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise BenchmarkError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BenchmarkError(f"{where}: field '{key}' is empty")
    return value.strip()


def _id_order(record_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order ("2" before "10"), any others after them by text."""
    return (0, int(record_id), "") if record_id.isdigit() else (1, 0, record_id)


def _read_scenario(path: Path) -> list[SafetyBenchRecord]:
    """The records of one ``NN-Scenario.json`` file, in id order."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: expected a JSON object of records by id, got {type(data).__name__}")
    if not data:
        raise BenchmarkError(f"{path}: no records in file")
    records = []
    for record_id in sorted(data, key=_id_order):
        where = f"{path}: record {record_id!r}"
        fields = {attr: _text_field(data[record_id], key, where) for key, attr in MMSB_FIELDS.items()}
        records.append(SafetyBenchRecord(scenario=path.stem, id=record_id, **fields))
    return records


def _read_tiny_ids(path: Path) -> set[tuple[str, str]]:
    """(scenario, id) pairs of the benchmark's tiny subset."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected a JSON list of scenarios, got {type(data).__name__}")
    pairs: set[tuple[str, str]] = set()
    for number, entry in enumerate(data):
        where = f"{path}: entry {number}"
        scenario = _text_field(entry, "Scenario", where)
        ids = entry.get("Sampled_ID_List")
        if not isinstance(ids, list) or not all(isinstance(i, int | str) and not isinstance(i, bool) for i in ids):
            raise BenchmarkError(f"{where}: 'Sampled_ID_List' must be a list of ids, got {ids!r}")
        pairs.update((scenario, str(i)) for i in ids)
    return pairs


def read_mm_safetybench(folder: str | Path, tiny_only: bool = False) -> list[SafetyBenchRecord]:
    """Every MM-SafetyBench record, by scenario then id; ``tiny_only`` keeps the benchmark's tiny subset.

    ``folder`` is the benchmarks folder or the ``MM-SafetyBench`` folder (the one holding
    ``processed_questions/``).
    """
    folder = Path(folder)
    root = folder / MMSB_DIR if (folder / MMSB_DIR).is_dir() else folder
    questions = root / MMSB_QUESTIONS_DIR
    if not questions.is_dir():
        raise BenchmarkError(f"{folder}: no {MMSB_DIR}/{MMSB_QUESTIONS_DIR} folder here; check build.benchmarks")
    files = sorted(questions.glob("*.json"))
    if not files:
        raise BenchmarkError(f"{questions}: no scenario .json files")
    records = [record for path in files for record in _read_scenario(path)]
    if not tiny_only:
        return records
    tiny_file = root / MMSB_TINY_FILE
    if not tiny_file.is_file():
        raise BenchmarkError(f"{tiny_file}: no such file (needed for tiny_only)")
    tiny = _read_tiny_ids(tiny_file)
    known = {(r.scenario, r.id) for r in records}
    unknown = sorted(tiny - known)
    if unknown:
        scenario, record_id = unknown[0]
        raise BenchmarkError(
            f"{tiny_file}: {len(unknown)} listed id(s) not in {questions}, e.g. scenario {scenario!r} id {record_id!r}"
        )
    return [r for r in records if (r.scenario, r.id) in tiny]


def read_mm_vet(folder: str | Path) -> list[BenignQuestion]:
    """MM-Vet's questions (benign, about an image that is not included), in file order."""
    path = _locate(folder, MMVET_DIR, MMVET_FILE)
    data = _load_json(path)
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    questions: list[BenignQuestion] = []
    seen: set[str] = set()
    for number, entry in enumerate(data):
        where = f"{path}: record {number}"
        record_id = _text_field(entry, "id", where)
        where = f"{path}: record {number} (id {record_id!r})"
        if record_id in seen:
            raise BenchmarkError(f"{where}: duplicate id")
        seen.add(record_id)
        questions.append(BenignQuestion(source=MMVET_SOURCE, id=record_id, text=_text_field(entry, "txt", where)))
    if not questions:
        raise BenchmarkError(f"{path}: no questions in file")
    return questions


def _first_input(task: dict[str, Any], where: str) -> str:
    """The first non-empty ``instances[].input`` of an alpaca task, or ``""``."""
    instances = task.get("instances", [])
    if not isinstance(instances, list):
        raise BenchmarkError(f"{where}: field 'instances' must be a list, got {type(instances).__name__}")
    for number, instance in enumerate(instances):
        value = instance.get("input", "") if isinstance(instance, dict) else None
        if not isinstance(value, str):
            raise BenchmarkError(f"{where}: instances[{number}] must be an object with a string 'input'")
        if value.strip():
            return value.strip()
    return ""


def read_alpaca_seed(folder: str | Path) -> list[BenignQuestion]:
    """The alpaca seed tasks (benign): each instruction, plus its first non-empty input after a newline."""
    path = _locate(folder, ALPACA_DIR, ALPACA_FILE)
    tasks: list[BenignQuestion] = []
    seen: set[str] = set()
    for number, where, task in json_lines(path, BenchmarkError, "benchmark file"):
        record_id = _text_field(task, "id", where)
        where = f"{path}:{number} (id {record_id!r})"
        if record_id in seen:
            raise BenchmarkError(f"{where}: duplicate id")
        seen.add(record_id)
        instruction = _text_field(task, "instruction", where)
        task_input = _first_input(task, where)
        text = f"{instruction}\n{task_input}" if task_input else instruction
        tasks.append(
            BenignQuestion(source=ALPACA_SOURCE, id=record_id, text=text, name=_text_field(task, "name", where))
        )
    if not tasks:
        raise BenchmarkError(f"{path}: no tasks in file")
    return tasks
