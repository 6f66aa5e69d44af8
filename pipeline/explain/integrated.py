"""Integrated gradients of ``||h_m - h_b||``: the differentiable signal and its path integral.

The request's token embeddings (and the image's OCR tokens or pixels) are spliced into *both*
framed prompts, so an input's attribution is its effect on the contrast between the malicious
and the benign framing at the fusion layer, not on either prompt alone.

The path integral is cut in two (see :func:`integrate`) so that the sharp start of the path
from zero embeddings gets its share of interpolation points; the result is still plain
integrated gradients along the straight path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import IntegratedGradients
from torch import nn
from transformers import DynamicCache

from pipeline.config import PLACEHOLDER
from pipeline.explain.spans import Span, overlapping_tokens, token_pieces
from pipeline.models.hooks import run_to_layers

# Interpolation points per backward pass: bounds activation memory, not the result.
DEFAULT_INTERNAL_BATCH = 8
# Where the integration path is cut (fractions of the way from baseline to input); see integrate.
PATH_SEGMENTS: tuple[float, ...] = (0.0, 0.1, 1.0)


@dataclass(frozen=True)
class IGSettings:
    """Where and how finely one attribution integrates: the fusion layer, the interpolation points,
    and how many points go through the model at once."""

    fusion_layer: int
    steps: int
    internal_batch_size: int = DEFAULT_INTERNAL_BATCH


def splice(base: torch.Tensor, parts: Sequence[tuple[Span, torch.Tensor]]) -> torch.Tensor:
    """``base`` embeddings ``(L, H)`` with ``(S, n, H)`` blocks written over token spans; returns ``(S, L, H)``."""
    steps = parts[0][1].shape[0]
    pieces: list[torch.Tensor] = []
    cursor = 0
    for (start, stop), block in sorted(parts, key=lambda part: part[0][0]):
        pieces.append(base[cursor:start].expand(steps, -1, -1))
        pieces.append(block.to(base.dtype))
        cursor = stop
    pieces.append(base[cursor:].expand(steps, -1, -1))
    return torch.cat(pieces, dim=1)


def shared_prefix_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common start of two token-id lists, at most ``limit``."""
    n = 0
    for x, y in zip(a[:limit], b[:limit], strict=True):
        if x != y:
            break
        n += 1
    return n


class FusionRunner:
    """Runs a decoder up to the fusion block on given input embeddings and returns last-token states.

    Tokens before every attributed input (system prompt, chat header, the templates' common start)
    are the same in both framings and at every interpolation step, so their keys and values are
    computed once, without gradients, and reused: the forward then covers only the tail.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, layer: int, prefix_ids: Sequence[int]) -> None:
        self.model = model
        self.blocks = blocks
        self.layer = layer
        self.prefix_len = len(prefix_ids)
        self.prefix_kv = self._prefix_kv(list(prefix_ids)) if prefix_ids else []

    def _prefix_kv(self, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        device = next(self.model.parameters()).device
        cache = DynamicCache()
        ids = torch.tensor([prefix_ids], device=device)
        with torch.no_grad():
            # Only blocks up to the fusion layer ever read the cache; the early stop skips the rest.
            run_to_layers(
                lambda: self.model(input_ids=ids, past_key_values=cache, use_cache=True),
                self.blocks,
                [self.layer],
                torch.ones_like(ids),
            )
        return [(cache.layers[k].keys, cache.layers[k].values) for k in range(self.layer + 1)]

    def states(self, embeds: torch.Tensor, **extra: Any) -> torch.Tensor:
        """Fusion-layer last-token states ``(S, hidden)`` float32 for full-prompt embeddings ``(S, L, H)``.

        The early stop raises from a hook after the state is captured; the autograd graph up to
        that block is intact, so gradients flow back to the inputs.
        """
        steps = embeds.shape[0]
        tail = embeds[:, self.prefix_len :]
        if self.prefix_kv:
            # A fresh cache per call: the forward appends the tail's keys and values to it.
            extra["past_key_values"] = DynamicCache(
                [(k.expand(steps, -1, -1, -1), v.expand(steps, -1, -1, -1)) for k, v in self.prefix_kv]
            )
        mask = torch.ones(steps, tail.shape[1], dtype=torch.long)
        forward = lambda: self.model(inputs_embeds=tail, use_cache=bool(self.prefix_kv), **extra)  # noqa: E731
        return run_to_layers(forward, self.blocks, [self.layer], mask)[:, 0]


@dataclass(frozen=True)
class Framing:
    """One framed prompt, tokenised as its adapter does, with where the attributed spans sit.

    ``pieces[name]`` is the text each token of span ``name`` stands for and ``starts[name]`` where
    each piece starts, relative to the span's first character.
    """

    input_ids: list[int]
    embeds: torch.Tensor  # (L, H), detached
    spans: dict[str, Span]
    pieces: dict[str, list[str]]
    starts: dict[str, list[int]]


def frame(
    adapter_model: nn.Module, ids: list[int], prompt: str, offsets: list[tuple[int, int]], chars: dict[str, Span]
) -> Framing:
    """A :class:`Framing` from a prompt's token ids, the offsets of its text tokens and character spans."""
    spans: dict[str, Span] = {}
    pieces: dict[str, list[str]] = {}
    starts: dict[str, list[int]] = {}
    for name, (start, stop) in chars.items():
        first, last = overlapping_tokens(offsets, start, stop)
        spans[name] = (first, last)
        pieces[name] = token_pieces(prompt, offsets[first:last], start, stop)
        starts[name] = [0] + [min(e, stop) - start for _, e in offsets[first : last - 1]]
    device = next(adapter_model.parameters()).device
    with torch.no_grad():
        embeds = adapter_model.get_input_embeddings()(torch.tensor([ids], device=device))[0].detach()
    return Framing(ids, embeds, spans, pieces, starts)


def check_same_tokens(benign: Framing, malicious: Framing, name: str) -> None:
    """The shared input only makes sense if both framings tokenise the span identically."""
    ids_b = benign.input_ids[slice(*benign.spans[name])]
    ids_m = malicious.input_ids[slice(*malicious.spans[name])]
    if ids_b != ids_m:
        raise ValueError(
            f"the {name} tokenises differently under the two templates; put the same separator before "
            f"{PLACEHOLDER} in both"
        )


def contrast_signal(
    runner: FusionRunner, benign: Framing, malicious: Framing, names: Sequence[str], with_pixels: bool
) -> Callable[..., torch.Tensor]:
    """``f(span embeddings..., [pixel_values]) = ||h_m - h_b||``, the same inputs spliced into both framings."""

    def states(framing: Framing, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        # inputs are the span embeddings in ``names`` order, then pixel_values when present.
        spans = [(framing.spans[n], x) for n, x in zip(names, inputs[: len(names)], strict=True)]
        embeds = splice(framing.embeds, spans)
        extra = {"pixel_values": inputs[len(names)]} if with_pixels else {}
        return runner.states(embeds, **extra)

    def signal(*inputs: torch.Tensor) -> torch.Tensor:
        return (states(malicious, inputs) - states(benign, inputs)).norm(dim=-1)

    return signal


def prefix_runner(
    model: nn.Module, blocks: nn.ModuleList, layer: int, benign: Framing, malicious: Framing, limit: int
) -> FusionRunner:
    """A runner caching the framings' common start, up to the first attributed token."""
    first_input = min([limit] + [start for start, _ in (*benign.spans.values(), *malicious.spans.values())])
    length = shared_prefix_length(benign.input_ids, malicious.input_ids, first_input)
    return FusionRunner(model, blocks, layer, benign.input_ids[:length])


def split_steps(steps: int, pieces: int) -> list[int]:
    """``steps`` interpolation points shared as evenly as possible over ``pieces`` segments."""
    return [steps // pieces + (1 if i < steps % pieces else 0) for i in range(pieces)]


def integrate(
    signal: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    baselines: tuple[torch.Tensor, ...],
    steps: int,
    internal_batch_size: int,
    segments: Sequence[float] = PATH_SEGMENTS,
) -> tuple[tuple[torch.Tensor, ...], float, float]:
    """IG attributions per input, plus the signal at the input and at the baseline.

    The straight path from baseline to input is integrated piecewise, each piece with its own
    Gauss-Legendre points. By additivity of the path integral the sum over pieces is exactly
    integrated gradients over the whole path; the cut only puts more points where the integrand
    changes fast. It does near a zero-embedding baseline: RMSNorm rescales a scaled embedding
    back to full size once ``alpha * rms(x)`` exceeds ``sqrt(eps)``, so on SmolLM2 the signal rises
    by a quarter and falls again within the first tenth of the path. With 64 points on OCR
    requests, cutting at 0.1 shrank the share of the signal change left unaccounted for from
    9-20% to about 1%.
    """
    with torch.no_grad():
        at_input = float(signal(*inputs)[0])
        at_baseline = float(signal(*baselines)[0])
    ig = IntegratedGradients(signal)
    totals = [torch.zeros_like(x, dtype=torch.float32, device="cpu") for x in inputs]
    bounds = list(zip(segments[:-1], segments[1:], strict=True))
    for (lo, hi), n in zip(bounds, split_steps(steps, len(bounds)), strict=True):
        start = tuple(b + lo * (x - b) for x, b in zip(inputs, baselines, strict=True))
        stop = tuple(b + hi * (x - b) for x, b in zip(inputs, baselines, strict=True))
        attributions = ig.attribute(stop, baselines=start, n_steps=n, internal_batch_size=internal_batch_size)
        for total, a in zip(totals, attributions, strict=True):
            total += a.detach().float().cpu()
    return tuple(t[0] for t in totals), at_input, at_baseline


def integrate_framings(
    model: nn.Module,
    blocks: nn.ModuleList,
    benign: Framing,
    malicious: Framing,
    names: Sequence[str],
    limit: int,
    settings: IGSettings,
    pixels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[tuple[torch.Tensor, ...], float, float]:
    """IG of the contrast over the named spans' embeddings (zero baseline) and, given ``pixels``, the image.

    ``pixels`` is ``(pixel_values, baseline pixel_values)``; ``limit`` is the first token that
    cannot be cached (see :func:`prefix_runner`). Returns :func:`integrate`'s result, inputs in
    ``names`` order, then the pixels.
    """
    for name in names:
        check_same_tokens(benign, malicious, name)
    runner = prefix_runner(model, blocks, settings.fusion_layer, benign, malicious, limit)
    signal = contrast_signal(runner, benign, malicious, names, with_pixels=pixels is not None)
    inputs = tuple(benign.embeds[slice(*benign.spans[n])].unsqueeze(0) for n in names)
    baselines = tuple(torch.zeros_like(x) for x in inputs)
    if pixels is not None:
        inputs += (pixels[0],)
        baselines += (pixels[1],)
    return integrate(signal, inputs, baselines, settings.steps, settings.internal_batch_size)
