"""Text-only baselines every evaluation reports next to the detectors, so a confound is visible.

Length-only and surface-style classifiers show how much of a score could come from how requests
are written rather than what they ask. The linear probes on the model's states (the fair
comparison for LSI) live in :mod:`pipeline.detect.detector`, because a guard can ship them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np


def length_features(texts: Sequence[str]) -> np.ndarray:
    """Characters and words per request text."""
    return np.array([[len(t), len(t.split())] for t in texts], dtype=np.float64)


def style_features(texts: Sequence[str]) -> np.ndarray:
    """Surface style: length, word length, punctuation, capitals, digits, questions, line breaks."""
    rows = []
    for text in texts:
        words = text.split() or [""]
        rows.append(
            [
                len(text),
                len(words),
                float(np.mean([len(w) for w in words])),
                len(re.findall(r"[^\w\s]", text)) / max(len(text), 1),
                sum(c.isupper() for c in text) / max(len(text), 1),
                sum(c.isdigit() for c in text) / max(len(text), 1),
                text.count("?"),
                text.count("\n"),
            ]
        )
    return np.array(rows, dtype=np.float64)
