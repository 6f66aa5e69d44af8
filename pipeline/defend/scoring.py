"""The detector's refusal score of requests, each the highest over its views (:mod:`pipeline.defend.views`).

Only the framings the detector reads run, each stopped after the deepest layer it reads, and read
as the detector's pooling says (last token, mean over the request's tokens, or both), so the
features are those the detector was trained on. A batch of
requests is scored in one pass over all their views; one request can instead be scored from a
shared-prefix session (:mod:`pipeline.models.session`) whose cache then serves the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.config import ContrastivePrompts
from pipeline.config.pooling import MEAN
from pipeline.detect.detector import Detector
from pipeline.detect.features import pooled_features, read_states, variant_groups
from pipeline.models.base import ModelAdapter, Request
from pipeline.models.session import PrefixNotShared, PrefixSession, supports_prefix_sessions


def view_scores(
    adapter: ModelAdapter,
    detector: Detector,
    prompts: ContrastivePrompts,
    layers: list[int],
    requests: Sequence[Request],
) -> np.ndarray:
    """The detector's score of each request's text as it is, one batched pass."""
    variants = detector.variants
    groups = variant_groups(requests, prompts, variants=variants)
    states = read_states(adapter, groups, layers, detector.reads).numpy()
    return detector.score_states(pooled_features(states, len(detector.reads)), layers, variants)


def highest_view_scores(
    adapter: ModelAdapter,
    detector: Detector,
    prompts: ContrastivePrompts,
    layers: list[int],
    requests: Sequence[Request],
    views: Sequence[Sequence[str]],
) -> np.ndarray:
    """Each request's highest score over its ``views`` (one list of texts per request), one batched pass.

    Shape ``(len(requests),)``; errors propagate.
    """
    if not requests:
        return np.zeros(0, dtype=np.float32)
    flat = [
        Request(text=text, image=request.image)
        for request, texts in zip(requests, views, strict=True)
        for text in texts
    ]
    scores = view_scores(adapter, detector, prompts, layers, flat)
    ends = np.cumsum([len(texts) for texts in views])
    highest = [scores[end - len(texts) : end].max() for end, texts in zip(ends, views, strict=True)]
    return np.asarray(highest, dtype=scores.dtype)


def session_score(
    adapter: ModelAdapter,
    detector: Detector,
    prompts: ContrastivePrompts,
    layers: list[int],
    request: Request,
    views: Sequence[str],
) -> tuple[PrefixSession | None, float]:
    """The score of ``request`` over its ``views``, from a shared-prefix session when the adapter supports one.

    The session (None when the adapter has none, or the framings share no prefix: then the score
    comes from :func:`highest_view_scores`) keeps its cache for the answer.
    """
    if supports_prefix_sessions(adapter):
        texts = prompts.variants(request.text)
        variants = detector.variants
        reads = detector.reads
        try:
            # The framings the detector reads, then the plain prompt the answer continues.
            session = PrefixSession(
                adapter,  # type: ignore[arg-type]
                [texts[v] for v in variants] + [texts["plain"]],
                request.image,
                spans=[prompts.request_span(v, request.text) for v in variants] + [None],
                mean_layers=layers if MEAN in reads else (),
            )
        except PrefixNotShared:
            session = None
        if session is not None:
            scores: list[float] = []
            # The session reads the request as it is; that counts only when it is one of the views
            # (a request with a forged turn is scored without its markup: pipeline.defend.views).
            own = bool(views) and views[0] == request.text
            if own:
                states = session.states(layers, reads).numpy()[None]
                scores.append(float(detector.score_states(pooled_features(states, len(reads)), layers, variants)[0]))
            extra = [Request(text=text, image=request.image) for text in (views[1:] if own else views)]
            if extra:
                scores.append(float(view_scores(adapter, detector, prompts, layers, extra).max()))
            return session, max(scores)
    return None, float(highest_view_scores(adapter, detector, prompts, layers, [request], [views])[0])
