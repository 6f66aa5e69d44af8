"""A deterministic subset of examples, balanced over labels and categories."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

from pipeline.data.benchmarks.schema import EvalExample


def sample_examples(examples: Sequence[EvalExample], limit: int, seed: int) -> list[EvalExample]:
    """At most ``limit`` examples (all when ``limit`` is 0 or covers them), balanced over label and category.

    Examples are grouped by (label, category), each group shuffled under ``seed``, and drawn round
    robin across groups, labels alternating, so a small sample still spans every scenario and
    both labels. The result keeps the input order, so it does not depend on the draw order.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0: all), got {limit}")
    if limit == 0 or limit >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    groups: dict[tuple[int, str], list[int]] = {}
    for position, example in enumerate(examples):
        groups.setdefault((example.label, example.category), []).append(position)
    queues = {key: rng.sample(members, len(members)) for key, members in groups.items()}
    # One rotation of categories per label; labels take turns (harmful first), so when one label
    # runs out the other fills the rest.
    rotations = {
        label: deque(sorted(key for key in queues if key[0] == label)) for label in sorted({k[0] for k in queues})
    }
    chosen: list[int] = []
    while len(chosen) < limit:
        for label in sorted(rotations, reverse=True):
            rotation = rotations[label]
            if rotation and len(chosen) < limit:
                key = rotation.popleft()
                chosen.append(queues[key].pop())
                if queues[key]:
                    rotation.append(key)
    return [examples[position] for position in sorted(chosen)]
