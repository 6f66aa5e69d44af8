"""DVC stage ``attribute``: where the harmful-intent signal comes from, for a few test requests.

For ``params.attribute.examples`` test-split rows (mostly harmful requests with images, at least
one benign one) it computes integrated gradients of ``||h_m - h_b||`` at the probe's fusion layer
and writes, under ``data/attribution/``:

- ``<row_id>_tokens.png``: the request's tokens (and any text read from the image) coloured by score;
- ``<row_id>_image.png``: when the row has an image, the image with a box per word the OCR read
  (embedded default model) or the vision encoder's patch grid (Hugging Face VLMs) coloured by
  score, the strongest numbered and listed beside it;
- ``attributions.json``: one record per row, with every score (tokens, OCR words and lines, or
  patches).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
from tqdm import tqdm

from pipeline.config import load_params
from stages.common import (
    BENIGN,
    HARMFUL,
    INDEX,
    PARAMS,
    PROBE_DIR,
    row_fields,
    row_request,
    run_stage,
    write_json_atomic,
)

OUT_DIR = Path("data/attribution")


def _spread(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows in order, but the first row of each category ahead of any repeats.

    A handful of examples then shows as many kinds of request as it can.
    """
    seen: set[Any] = set()
    first: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    for row in rows:
        (rest if row["category"] in seen else first).append(row)
        seen.add(row["category"])
    return first + rest


def _ordered_candidates(rows: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows with an image first, then those without; each group by ``row_id``, spread over categories."""
    ordered = rows.sort("row_id").to_dicts()
    with_image = [row for row in ordered if row["image_path"] is not None]
    without = [row for row in ordered if row["image_path"] is None]
    return _spread(with_image) + _spread(without)


def pick_examples(index: pl.DataFrame, n: int) -> pl.DataFrame:
    """A deterministic choice of ``n`` test-split rows: mostly harmful with images, at least one benign.

    One benign row per four examples (at least one once ``n >= 2``); when a label runs short the
    other fills in. Returned sorted by ``row_id``.
    """
    if n < 1:
        raise ValueError(f"attribute.examples must be at least 1, got {n}")
    test = index.filter(pl.col("split") == "test").sort("row_id")
    if test.height == 0:
        raise ValueError("the index has no test-split rows to attribute")
    candidates = {label: _ordered_candidates(test.filter(pl.col("label") == label)) for label in (HARMFUL, BENIGN)}
    want_benign = max(1, n // 4) if n >= 2 else 0
    take = {BENIGN: min(want_benign, len(candidates[BENIGN]))}
    take[HARMFUL] = min(n - take[BENIGN], len(candidates[HARMFUL]))
    take[BENIGN] = min(n - take[HARMFUL], len(candidates[BENIGN]))
    chosen = [row["row_id"] for label in (HARMFUL, BENIGN) for row in candidates[label][: take[label]]]
    return test.filter(pl.col("row_id").is_in(chosen)).sort("row_id")


def row_title(row: Mapping[str, Any]) -> str:
    """A figure title naming the row, its label and category."""
    label = "harmful" if row["label"] == HARMFUL else "benign"
    return f"row {row['row_id']} ({label}, {row['category']})"


def main() -> None:
    """Pick rows, attribute each, write figures and the JSON records."""
    # Imported here so the pure helpers above load without the model stack.
    from pipeline.data.sources import read_index
    from pipeline.detect.probe import load_probe
    from pipeline.explain.attribution import attribution_to_json, intent_attribution, safe_name
    from pipeline.explain.plots import plot_image_map, plot_token_heatmap
    from pipeline.models.registry import load_adapter

    params = load_params(PARAMS)
    rows = pick_examples(read_index(INDEX), params.attribute.examples).to_dicts()
    _, meta = load_probe(PROBE_DIR)
    adapter = load_adapter(params.model)

    records: list[dict[str, Any]] = []
    for row in tqdm(rows, desc="attribute", unit="req"):
        request = row_request(row)
        attribution = intent_attribution(adapter, request, params.prompts, meta.fusion_layer, params.attribute.steps)
        name = safe_name(row["row_id"])
        tokens_png = OUT_DIR / f"{name}_tokens.png"
        plot_token_heatmap(attribution, tokens_png, title=row_title(row))
        image_png = None
        if request.image is not None:
            image_png = OUT_DIR / f"{name}_image.png"
            plot_image_map(attribution, request.image, image_png, title=row_title(row))
        records.append(
            {
                **row_fields(row),
                "tokens_png": str(tokens_png),
                "image_png": None if image_png is None else str(image_png),
                "attribution": attribution_to_json(attribution),
            }
        )
    write_json_atomic(OUT_DIR / "attributions.json", records)
    print(f"attributed {len(records)} requests at fusion layer {meta.fusion_layer} -> {OUT_DIR}")


if __name__ == "__main__":
    run_stage(main)
