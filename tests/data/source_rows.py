"""Request rows and small source files shared by the source and index tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from tests.paths import PROJECT_ROOT

DEMO = PROJECT_ROOT / "data" / "demo" / "requests.jsonl"


def request_row(i: int, label: str = "benign", category: str = "cooking", **extra: Any) -> dict[str, Any]:
    """A valid source row ``r<i>``; ``extra`` adds or overrides fields."""
    return {"request_id": f"r{i}", "category": category, "label": label, "text": f"request number {i}", **extra}


def write_source(path: Path, rows: list[Any]) -> Path:
    """Rows as JSONL; a str row is written verbatim (to plant broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def small_source(path: Path) -> Path:
    """Sixteen requests over two categories and both labels, with every image kind."""
    image = path.parent / "pics" / "photo.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(image)
    rows = []
    for i in range(16):
        label = "harmful" if i % 2 else "benign"
        category = "a" if i % 4 < 2 else "b"
        rows.append(request_row(i, label, category))
    rows[1]["image"] = {"kind": "typography", "text": "typed words"}
    rows[2]["image"] = {"kind": "scene", "seed": 5, "caption": "a field"}
    rows[3]["image"] = "pics/photo.png"
    rows.append({**request_row(1, "harmful", "a"), "text": "the same request, as plain text"})
    return write_source(path, rows)
