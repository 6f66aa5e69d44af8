"""DVC stage ``attribute``: where a request's score comes from, for a few test requests.

For ``params.attribute.examples`` test-split rows (mostly harmful requests with images, at least
one benign one) it computes integrated gradients of ``params.attribute.target``: the shipped
detector's logit (``detector``, what the guard decides on) or ``||h_m - h_b||`` at the probe's
fusion layer (``contrast``), and writes, under ``data/attribution/``:

- ``<row_id>_tokens.png``: the request's tokens (and any text read from the image) coloured by score;
- ``<row_id>_image.png``: when the row has an image, the image with a box per word the OCR read
  (embedded default model) or the vision encoder's patch grid (Hugging Face VLMs) coloured by
  score, the strongest numbered and listed beside it;
- ``attributions.json``: one record per row, with every score (tokens, OCR words and lines, or
  patches), the target attributed and the detector.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from pipeline.config import load_params
from pipeline.data.index import read_index
from pipeline.data.rows import pick_examples, row_fields, row_title
from pipeline.detect.extraction import row_request
from pipeline.detect.shipped import load_detector
from pipeline.explain.attribution import attribution_target, attribution_to_json, intent_attribution, safe_name
from pipeline.explain.plots import plot_image_map, plot_token_heatmap
from pipeline.io import write_json_atomic
from pipeline.layout import ATTRIBUTION_DIR, INDEX, PARAMS, PROBE_DIR
from pipeline.models.registry import load_adapter
from stages import run_stage

OUT_DIR = ATTRIBUTION_DIR


def main() -> None:
    """Pick rows, attribute each, write figures and the JSON records."""
    params = load_params(PARAMS)
    rows = pick_examples(read_index(INDEX), params.attribute.examples).to_dicts()
    detector, meta = load_detector(PROBE_DIR)
    target = attribution_target(params.attribute.target, detector, meta.fusion_layer)
    adapter = load_adapter(params.model, params.limits.max_request_tokens)

    records: list[dict[str, Any]] = []
    for row in tqdm(rows, desc="attribute", unit="req"):
        request = row_request(row)
        attribution = intent_attribution(adapter, request, params.prompts, target, params.attribute.steps)
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
    print(f"attributed {target.label} for {len(records)} requests -> {OUT_DIR}")


if __name__ == "__main__":
    run_stage(main)
