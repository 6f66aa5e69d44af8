"""Write data/public/ from the refusal_direction processed instruction files (a maintainer's tool).

The default run trains on public harmful instructions and benign Alpaca instructions. This script
copies the permissively licensed harmful sets whole, and every single-line Alpaca question plus a
seeded sample of the other single-line Alpaca instructions, into ``data/public/``, with
``provenance.json`` naming each file's upstream, licence and the sha256 of the file it was taken
from. Run it from the project root::

    python scripts/vendor_public.py ../shared/benchmarks/instructions

MaliciousInstruct and TDC 2023 are left out: their upstreams state no licence that allows
redistribution.
"""

from __future__ import annotations

import hashlib
import json
import sys
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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(folder: Path) -> None:
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
    (OUT / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(provenance)} files under {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/benchmarks/instructions"))
