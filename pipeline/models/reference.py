"""The naive procedure every faster path is checked against: full forwards with ``output_hidden_states``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.models.base import Request, check_layers
from pipeline.models.forward import ForwardModel, image_inputs_of


def reference_states(
    model: ForwardModel,
    requests: Sequence[Request],
    layers: Sequence[int],
    prompts_per_forward: int = 1,
    with_head: bool = True,
) -> torch.Tensor:
    """The naive procedure: full-depth forwards with ``output_hidden_states=True``, a few prompts at a time.

    Block ``k``'s output is ``hidden_states[k + 1]``. The last block cannot be read this way,
    because transformers 5 applies the final norm to the last entry of ``hidden_states``.
    ``with_head=False`` runs the base model only, skipping the vocabulary projection.
    """
    layers = list(layers)
    check_layers(layers, model.info.num_layers)
    if max(layers) >= model.info.num_layers - 1:
        raise ValueError("the reference reads hidden_states[k + 1], which carries the final norm for the last block")
    rows: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(requests), prompts_per_forward):
            batch = model.encode(requests[start : start + prompts_per_forward])
            ids, mask = batch["input_ids"], batch["attention_mask"]
            positions = model.position_ids(ids, mask, image_inputs_of(batch))
            network = model.model if with_head else model.model.base_model
            output = network(**batch, position_ids=positions, output_hidden_states=True, use_cache=False)
            hidden = output.hidden_states
            # Left padding: every prompt ends in the last column.
            rows.append(torch.stack([hidden[k + 1][:, -1] for k in layers], dim=1).float().cpu())
    return torch.cat(rows)
