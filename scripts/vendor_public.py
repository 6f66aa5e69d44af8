"""Write data/public/ from the refusal_direction processed instruction files (a maintainer's tool).

The default run trains on public harmful instructions and benign Alpaca instructions. This script
copies the permissively licensed harmful sets whole, and every single-line Alpaca question plus a
seeded sample of the other single-line Alpaca instructions, into ``data/public/``, with
``provenance.json`` naming each file's upstream, licence and the sha256 of the file it was taken
from. Two benign sets come from other stored copies, saved by hand into a second folder under the
names below (``OTHER``): JailbreakBench's benign look-alikes of its harmful behaviours and the
Vicuna benchmark questions of FastChat, each copied whole. Run it from the project root::

    python scripts/vendor_public.py ../shared/benchmarks/instructions path/to/other/copies

MaliciousInstruct and TDC 2023 are left out: their upstreams state no licence that allows
redistribution.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

OUT = Path("data/public")
ORIGIN = {"repo": "andyrdt/refusal_direction", "commit": "9d852fae", "folder": "dataset/processed"}
ALPACA_SAMPLE = 3000
SEED = 0

# file -> (upstream project, upstream repository, licence)
HARMFUL: dict[str, tuple[str, str, str]] = {
    "advbench.json": ("AdvBench", "llm-attacks/llm-attacks", "MIT"),
    "harmbench_test.json": ("HarmBench (test)", "centerforaisafety/HarmBench", "MIT"),
    "harmbench_val.json": ("HarmBench (validation)", "centerforaisafety/HarmBench", "MIT"),
    "jailbreakbench.json": ("JailbreakBench (JBB-Behaviors)", "JailbreakBench/jailbreakbench", "MIT"),
    "strongreject.json": ("StrongREJECT", "alexandrasouly/strongreject", "MIT"),
}
BENIGN = ("alpaca_harmless.json", ("Stanford Alpaca", "tatsu-lab/stanford_alpaca", "CC-BY-NC-4.0"))


def jbb_benign(text: str) -> list[dict]:
    """JBB-Behaviors' benign-behaviors.csv: the goal is the request, the category its harm category's name."""
    return [{"instruction": row["goal"], "category": row["category"]} for row in csv.DictReader(io.StringIO(text))]


def vicuna_bench(text: str) -> list[dict]:
    """FastChat's vicuna_bench/question.jsonl: one single-turn question a line."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [{"instruction": row["turns"][0], "category": row["category"]} for row in rows]


# Name in the folder of other copies -> (output file, project, upstream, licence, where the copy was read, reader).
OTHER: dict[str, tuple[str, str, str, str, dict[str, str], Callable[[str], list[dict]]]] = {
    "benign-behaviors.csv": (
        "benign/jailbreakbench_benign.json",
        "JailbreakBench (JBB-Behaviors, benign)",
        "JailbreakBench/jailbreakbench",
        "MIT",
        {
            "repo": "Baisayan/hack",
            "commit": "2b37da1c255e43e16a74ecd3e51c99ea992b5237",
            "folder": "data",
            "path": "data/benign-behaviors.csv",
        },
        jbb_benign,
    ),
    "question.jsonl": (
        "benign/vicuna_bench.json",
        "Vicuna benchmark questions (FastChat)",
        "lm-sys/FastChat",
        "Apache-2.0",
        {
            "repo": "lm-sys/FastChat",
            "commit": "589532dcfa83700f950b9aa3983416c543afabc0",
            "folder": "fastchat/llm_judge/data/vicuna_bench",
            "path": "fastchat/llm_judge/data/vicuna_bench/question.jsonl",
        },
        vicuna_bench,
    ),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def whole_set(records: list[dict]) -> tuple[list[dict], str]:
    """Every single-line record once, in upstream order, and the rule that says so."""
    single = [r for r in records if "\n" not in r["instruction"].strip()]
    kept: list[dict] = []
    seen: set[str] = set()
    for record in single:
        if record["instruction"] not in seen:
            seen.add(record["instruction"])
            kept.append(record)
    if len(kept) == len(records):
        return kept, f"all {len(records)} records, in upstream order"
    return kept, (
        f"{len(kept)} of {len(records)} records: multi-line ones ({len(records) - len(single)}) and exact "
        f"duplicates ({len(single) - len(kept)}) left out, in upstream order"
    )


def main(folder: Path, other: Path) -> None:
    provenance = []
    for name, (project, repo, licence) in HARMFUL.items():
        records = json.loads((folder / name).read_text(encoding="utf-8"))
        write(OUT / "harmful" / name, records)
        provenance.append(
            {
                "file": f"harmful/{name}",
                "label": "harmful",
                "project": project,
                "upstream": repo,
                "license": licence,
                "taken_from": {**ORIGIN, "path": f"{ORIGIN['folder']}/{name}", "sha256": sha256(folder / name)},
                "records": len(records),
                "selection": "all records",
            }
        )
    name, (project, repo, licence) = BENIGN
    records = json.loads((folder / name).read_text(encoding="utf-8"))
    # Single-line instructions only: an Alpaca "input" block would tell the label by its layout.
    single = [r for r in records if "\n" not in r["instruction"].strip()]
    # Every question (the harmful questions are long and few benign ones are), a sample of the rest.
    questions = [i for i, r in enumerate(single) if r["instruction"].strip().endswith("?")]
    others = [i for i, r in enumerate(single) if not r["instruction"].strip().endswith("?")]
    drawn = np.random.default_rng(SEED).choice(len(others), ALPACA_SAMPLE, replace=False)
    sample = [single[i] for i in sorted(questions + [others[j] for j in drawn.tolist()])]
    write(OUT / "benign" / "alpaca.json", sample)
    provenance.append(
        {
            "file": "benign/alpaca.json",
            "label": "benign",
            "project": project,
            "upstream": repo,
            "license": licence,
            "taken_from": {**ORIGIN, "path": f"{ORIGIN['folder']}/{name}", "sha256": sha256(folder / name)},
            "records": len(sample),
            "selection": (
                f"all {len(questions)} single-line questions and {ALPACA_SAMPLE} of the other {len(others)} "
                f"single-line instructions (numpy default_rng({SEED}).choice), in upstream order"
            ),
        }
    )
    for source, (file, project, repo, licence, origin, read) in OTHER.items():
        # The copies were saved as read from the index; the hash is of that text, encoded as UTF-8.
        text = (other / source).read_text(encoding="utf-8")
        records, selection = whole_set(read(text))
        write(OUT / file, records)
        provenance.append(
            {
                "file": file,
                "label": file.split("/")[0],
                "project": project,
                "upstream": repo,
                "license": licence,
                "taken_from": {**origin, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()},
                "records": len(records),
                "selection": selection,
            }
        )
    (OUT / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(provenance)} files under {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/vendor_public.py REFUSAL_DIRECTION_PROCESSED_FOLDER OTHER_COPIES_FOLDER")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
