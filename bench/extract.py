"""Extraction speed: the pipeline's batched, early-exit path against the naive reference, same run.

Naive reference (the method's straightforward procedure): one request at a time, its framings
in one batch, the full forward with ``output_hidden_states=True``. Prints a table and writes JSON.

    python bench/extract.py --requests 48 --out bench/results/extract.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_params
from pipeline.dataset import read_index
from pipeline.extraction import requests_from_index
from pipeline.features import states_for_requests
from pipeline.models.base import Request
from pipeline.models.embedded import EmbeddedAdapter
from pipeline.models.registry import load_adapter
from pipeline.prompts import VARIANTS
from stages.common import INDEX


def naive_states(adapter: EmbeddedAdapter, requests: Sequence[Request], prompts, layers: Sequence[int]) -> np.ndarray:
    """One request at a time, its three framings batched, full depth, every hidden state kept."""
    tokenizer, model = adapter.tokenizer, adapter.model
    rows = []
    for request in requests:
        texts = prompts.variants(request.text)
        framed = [adapter.prompt_text(Request(texts[v], request.image)) for v in VARIANTS]
        batch = tokenizer(framed, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        # left padding: position -1 is each prompt's last real token
        rows.append(torch.stack([torch.stack([hidden[k + 1][v, -1] for k in layers]) for v in range(len(VARIANTS))]))
    return torch.stack(rows).float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests to extract (from the prepared index)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/extract.json"))
    args = parser.parse_args()

    params = load_params()
    adapter = load_adapter(params.model)
    if not isinstance(adapter, EmbeddedAdapter):
        raise SystemExit("this benchmark's naive reference is written for the embedded default model")
    index = read_index(INDEX).sort("row_id").head(args.requests)
    requests = requests_from_index(index)
    layers = list(params.extract.layers)
    for request in requests:  # warm the OCR cache so both paths time the model alone
        adapter.user_content(request)

    start = time.perf_counter()
    naive = naive_states(adapter, requests, params.prompts, layers)
    naive_s = time.perf_counter() - start

    start = time.perf_counter()
    fast_rows = []
    for lo in range(0, len(requests), args.batch_size):
        fast_rows.append(
            states_for_requests(adapter, requests[lo : lo + args.batch_size], params.prompts, layers).numpy()
        )
    fast = np.concatenate(fast_rows)
    fast_s = time.perf_counter() - start

    max_rel = float(np.abs(fast - naive).max() / np.abs(naive).max())
    result = {
        "model": adapter.info.name,
        "requests": len(requests),
        "layers": layers,
        "batch_size": args.batch_size,
        "naive_seconds": naive_s,
        "fast_seconds": fast_s,
        "naive_requests_per_s": len(requests) / naive_s,
        "fast_requests_per_s": len(requests) / fast_s,
        "speedup": naive_s / fast_s,
        "max_abs_diff_relative": max_rel,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(f"{'path':8s} {'seconds':>8s} {'req/s':>8s}")
    print(f"{'naive':8s} {naive_s:8.2f} {result['naive_requests_per_s']:8.2f}")
    print(f"{'fast':8s} {fast_s:8.2f} {result['fast_requests_per_s']:8.2f}")
    print(f"speed-up {result['speedup']:.2f}x; max |diff| / max |state| = {max_rel:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
