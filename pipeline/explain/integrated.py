"""Integrated gradients of a target score: the differentiable signal and its path integral.

The target (:mod:`pipeline.explain.targets`) is the shipped detector's logit or the contrast
``||h_m - h_b||``; it reads pooled states of some framings (benign, malicious, plain) at some
layers: the last token's, the mean over the request's own tokens, or both side by side, as the
store the detector was trained on holds them (``extract.pooling``). The request's token
embeddings (and the image's OCR tokens or pixels) are spliced into *every* framing it reads,
so an input's attribution is its effect on the target through all of them at once, not
through one prompt alone.

The path integral is cut in two (see :func:`integrate`) so that the sharp start of the path
from zero embeddings gets its share of interpolation points; the result is still plain
integrated gradients along the straight path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import IntegratedGradients
from torch import nn
from transformers import DynamicCache

from pipeline.config import PLACEHOLDER
from pipeline.config.pooling import LAST, MEAN, pooling_reads
from pipeline.explain.spans import Span, overlapping_tokens, token_pieces
from pipeline.explain.targets import Target
from pipeline.models.hooks import read_layers, run_to_layers, token_reader, weighted_sum_reader

# Interpolation points per backward pass: bounds activation memory, not the result.
DEFAULT_INTERNAL_BATCH = 8
# Where the integration path is cut (fractions of the way from baseline to input); see integrate.
PATH_SEGMENTS: tuple[float, ...] = (0.0, 0.1, 1.0)


@dataclass(frozen=True, kw_only=True)
class IGSettings:
    """What and how finely one attribution integrates: the target, the interpolation points,
    how many points go through the model at once, and whether framings that begin alike run
    their common start once (:func:`shared_start`; the same result, at less cost)."""

    target: Target
    steps: int
    internal_batch_size: int = DEFAULT_INTERNAL_BATCH
    share_starts: bool = True


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


class LayerRunner:
    """Runs a decoder up to the deepest of ``layers`` on given input embeddings; returns last-token states.

    Tokens before every attributed input (system prompt, chat header, the templates' common start)
    are the same in every framing and at every interpolation step, so their keys and values are
    computed once, without gradients, and reused: the forward then covers only the tail.
    """

    def __init__(
        self, *, model: nn.Module, blocks: nn.ModuleList, layers: Sequence[int], prefix_ids: Sequence[int]
    ) -> None:
        if not layers:
            raise ValueError("a layer runner needs at least one layer")
        self.model = model
        self.blocks = blocks
        self.layers = list(layers)
        self.prefix_len = len(prefix_ids)
        self.prefix_kv = self._prefix_kv(list(prefix_ids)) if prefix_ids else []

    def _prefix_kv(self, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        device = next(self.model.parameters()).device
        cache = DynamicCache()
        ids = torch.tensor([prefix_ids], device=device)
        deepest = max(self.layers)
        with torch.no_grad():
            # Only blocks up to the deepest layer ever read the cache; the early stop skips the rest.
            run_to_layers(
                lambda: self.model(input_ids=ids, cache=cache, use_cache=True),
                self.blocks,
                [deepest],
                torch.ones_like(ids),
            )
        return [(cache.layers[k].keys, cache.layers[k].values) for k in range(deepest + 1)]

    def states(self, embeds: torch.Tensor, **extra: Any) -> torch.Tensor:
        """Last-token states ``(S, len(layers), hidden)`` float32 for full-prompt embeddings ``(S, L, H)``.

        The early stop raises from a hook after the deepest state is captured; the autograd graph
        up to that block is intact, so gradients flow back to the inputs.
        """
        return self.pooled(embeds, (LAST,), [], **extra)[LAST]

    def pooled(
        self, embeds: torch.Tensor, reads: Sequence[str], mean_positions: Sequence[int], **extra: Any
    ) -> dict[str, torch.Tensor]:
        """The ``reads`` of full-prompt embeddings ``(S, L, H)``, each ``(S, len(layers), hidden)`` float32:
        ``last``, the last token's state; ``mean``, the mean over the prompt positions ``mean_positions``
        (the request's own tokens, all after the cached prefix), as extraction reads them."""
        steps = embeds.shape[0]
        tail = embeds[:, self.prefix_len :]
        if self.prefix_kv:
            extra["cache"] = self._prefix_cache(steps)
        mask = torch.ones(steps, tail.shape[1], dtype=torch.long)
        forward = lambda: self.model(inputs_embeds=tail, use_cache=bool(self.prefix_kv), **extra)  # noqa: E731
        if tuple(reads) == (LAST,):
            return {LAST: run_to_layers(forward, self.blocks, self.layers, mask)}
        if not mean_positions or min(mean_positions) < self.prefix_len:
            raise ValueError("a mean read needs the request's positions, all after the cached prefix")
        weights = self._mean_weights(steps, tail.shape[1], mean_positions)
        readers = {
            LAST: token_reader(torch.arange(steps), torch.full((steps,), tail.shape[1] - 1)),
            MEAN: weighted_sum_reader(weights),
        }
        kept = read_layers(forward, self.blocks, self.layers, [readers[r] for r in reads])
        return dict(zip(reads, kept, strict=True))

    def _prefix_cache(self, steps: int) -> DynamicCache:
        """A fresh cache holding the prefix's keys and values for ``steps`` rows (empty without a prefix);
        fresh per forward, since the forward appends its own tokens' keys and values to it."""
        if not self.prefix_kv:
            return DynamicCache()
        return DynamicCache([(k.expand(steps, -1, -1, -1), v.expand(steps, -1, -1, -1)) for k, v in self.prefix_kv])

    def _mean_weights(self, steps: int, length: int, mean_positions: Sequence[int]) -> torch.Tensor:
        """Weights ``(steps, 1, length)`` over a forward's tokens (those after the cached prefix) that
        average the prompt positions ``mean_positions``."""
        weights = torch.zeros(steps, 1, length)
        weights[:, 0, [p - self.prefix_len for p in mean_positions]] = 1.0 / len(mean_positions)
        return weights

    def shared_then_tails(
        self, shared: torch.Tensor, tails: Sequence[torch.Tensor], reads: Sequence[str], mean_positions: Sequence[int]
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`pooled` of prompts that begin alike, their common part run once.

        ``shared`` ``(S, P, H)`` is the full-prompt embeddings of the tokens every prompt starts
        with, ``tails[i]`` ``(S, T_i, H)`` the rest of prompt ``i``. The common part's keys and
        values, still attached to the graph, serve every tail, so gradients reach the inputs through
        each prompt. ``last`` is read at each tail's end; ``mean`` over ``mean_positions``, which lie
        in the common part (after the cached prefix), where every prompt's states are the same.
        """
        steps, deepest = shared.shape[0], max(self.layers)
        body = shared[:, self.prefix_len :]
        cache = self._prefix_cache(steps)
        forward = lambda: self.model(inputs_embeds=body, cache=cache, use_cache=True)  # noqa: E731
        if MEAN in reads:
            if not mean_positions or min(mean_positions) < self.prefix_len or max(mean_positions) >= shared.shape[1]:
                raise ValueError("a mean read over a shared start needs the request's positions inside it")
            weights = self._mean_weights(steps, body.shape[1], mean_positions)
            mean = read_layers(forward, self.blocks, self.layers, [weighted_sum_reader(weights)])[0]
        else:
            # Run the common part for its cache alone, stopping after the deepest block as ever.
            run_to_layers(forward, self.blocks, [deepest], last_positions=torch.zeros(steps, dtype=torch.long))
        # Every tail in one forward, stacked on the batch axis: a block call costs about the same for
        # one prompt or several, and it is the calls, not the tokens, that dominate on small inputs.
        # Shorter tails are padded at their end, which no earlier position attends to (causal).
        n, width = len(tails), max(tail.shape[1] for tail in tails)
        padded = torch.cat([nn.functional.pad(tail, (0, 0, 0, width - tail.shape[1])) for tail in tails])
        common = [
            (cache.layers[k].keys.repeat(n, 1, 1, 1), cache.layers[k].values.repeat(n, 1, 1, 1))
            for k in range(deepest + 1)
        ]
        stacked = DynamicCache(common)
        ends = torch.tensor([tail.shape[1] - 1 for tail in tails]).repeat_interleave(steps)
        last = run_to_layers(
            lambda: self.model(inputs_embeds=padded, cache=stacked, use_cache=True),
            self.blocks,
            self.layers,
            last_positions=ends,
        )
        return [{LAST: part, MEAN: mean} if MEAN in reads else {LAST: part} for part in last.split(steps, dim=0)]


def shared_start(framings: Sequence[Framing], cached: int) -> int:
    """How many leading tokens the framings share that :meth:`LayerRunner.shared_then_tails` can run
    once: 0 when fewer than two framings, or when the common start does not reach past the cached
    prefix ``cached`` to hold every attributed span (at the same positions in each) with a token of
    each framing left after it.

    With ``prompts.position: after`` the framings differ only after the request, so the request
    (and an image's OCR text) runs once instead of once per framing.
    """
    if len(framings) < 2 or any(framing.spans != framings[0].spans for framing in framings):
        return 0
    ids = [framing.input_ids for framing in framings]
    limit = min(len(x) for x in ids) - 1
    length = min(shared_prefix_length(ids[0], other, limit) for other in ids[1:])
    end = max(stop for _, stop in framings[0].spans.values())
    return length if length > cached and end <= length else 0


@dataclass(frozen=True, kw_only=True)
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

    @property
    def request_positions(self) -> list[int]:
        """The positions of the request's own tokens (its text's and an image's OCR text's), which
        a mean read averages over; the spans are exactly those tokens."""
        return sorted({p for first, last in self.spans.values() for p in range(first, last)})


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
    return Framing(input_ids=ids, embeds=embeds, spans=spans, pieces=pieces, starts=starts)


def check_same_tokens(reference: tuple[str, Framing], other: tuple[str, Framing], name: str) -> None:
    """One input spliced into several framings only makes sense if they all tokenise its span identically.

    ``reference`` and ``other`` are ``(variant, framing)`` pairs.
    """
    (ref_name, ref), (other_name, framing) = reference, other
    if ref.input_ids[slice(*ref.spans[name])] == framing.input_ids[slice(*framing.spans[name])]:
        return
    if "plain" in (ref_name, other_name):
        framed = other_name if ref_name == "plain" else ref_name
        raise ValueError(
            f"the {name} tokenises differently in the plain prompt and under the {framed} framing (the "
            f"text before {PLACEHOLDER} changes its first token), so one set of embeddings cannot stand in "
            "both; attribute the contrast, or a detector that reads the plain prompt alone or the framings "
            "alone, or put the request first (prompts.position: after)"
        )
    raise ValueError(
        f"the {name} tokenises differently under the {ref_name} and {other_name} templates; put the same "
        f"separator before {PLACEHOLDER} in both"
    )


def target_signal(
    runner: LayerRunner,
    framings: Mapping[str, Framing],
    names: Sequence[str],
    with_pixels: bool,
    target: Target,
    share_starts: bool = True,
) -> Callable[..., torch.Tensor]:
    """``f(span embeddings..., [pixel_values]) = target score``, the same inputs spliced into every framing.

    ``framings`` holds one :class:`Framing` per variant the target reads; ``runner`` reads the
    target's layers. Where the framings begin alike through every input (:func:`shared_start`),
    that start runs once per point instead of once per framing (``share_starts``; off, each
    framing runs whole: the same function, ~1.5-2x the cost).
    """

    reads = pooling_reads(target.pooling)
    ordered = [framings[variant] for variant in target.variants]
    # Images reach a VLM as pixels through its own image tokens; only text inputs share a start.
    common = 0 if with_pixels or not share_starts else shared_start(ordered, runner.prefix_len)

    def shared_states(inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        reference = ordered[0]
        spans = [(reference.spans[n], x) for n, x in zip(names, inputs, strict=True)]
        shared = splice(reference.embeds[:common], spans)
        steps = shared.shape[0]
        tails = [framing.embeds[common:].expand(steps, -1, -1) for framing in ordered]
        kept = runner.shared_then_tails(shared, tails, reads, reference.request_positions)
        return {
            variant: torch.cat([got[r] for r in reads], dim=-1)
            for variant, got in zip(target.variants, kept, strict=True)
        }

    def states(framing: Framing, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        # inputs are the span embeddings in ``names`` order, then pixel_values when present.
        spans = [(framing.spans[n], x) for n, x in zip(names, inputs[: len(names)], strict=True)]
        embeds = splice(framing.embeds, spans)
        extra = {"pixel_values": inputs[len(names)]} if with_pixels else {}
        kept = runner.pooled(embeds, reads, framing.request_positions, **extra)
        # A detector's feature: its reads side by side on the feature axis, last first (as stored).
        return torch.cat([kept[r] for r in reads], dim=-1)

    def signal(*inputs: torch.Tensor) -> torch.Tensor:
        if common:
            read = shared_states(inputs)
        else:
            read = {variant: states(framings[variant], inputs) for variant in target.variants}

        def get(part: str, layer: int) -> torch.Tensor:
            at = runner.layers.index(layer)
            if part == "delta":
                return read["malicious"][:, at] - read["benign"][:, at]
            return read[part][:, at]

        return target.score(get)

    return signal


def prefix_runner(
    model: nn.Module, blocks: nn.ModuleList, layers: Sequence[int], framings: Sequence[Framing], limit: int
) -> LayerRunner:
    """A runner over ``layers`` caching the framings' common start, up to the first attributed token."""
    first_input = min([limit] + [start for framing in framings for start, _ in framing.spans.values()])
    ids = framings[0].input_ids
    length = min(shared_prefix_length(ids, framing.input_ids, first_input) for framing in framings)
    return LayerRunner(model=model, blocks=blocks, layers=layers, prefix_ids=ids[:length])


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
    framings: Mapping[str, Framing],
    names: Sequence[str],
    limit: int,
    settings: IGSettings,
    pixels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[tuple[torch.Tensor, ...], float, float]:
    """IG of the target over the named spans' embeddings (zero baseline) and, given ``pixels``, the image.

    ``framings`` holds one :class:`Framing` per variant the target reads; the inputs are taken
    from the first (store order), whose token pieces the record shows. ``pixels`` is
    ``(pixel_values, baseline pixel_values)``; ``limit`` is the first token that cannot be cached
    (see :func:`prefix_runner`). Returns :func:`integrate`'s result, inputs in ``names`` order,
    then the pixels.
    """
    target = settings.target
    ordered = [(variant, framings[variant]) for variant in target.variants]
    reference = ordered[0][1]
    for name in names:
        for other in ordered[1:]:
            check_same_tokens(ordered[0], other, name)
    runner = prefix_runner(model, blocks, target.layers, [framing for _, framing in ordered], limit)
    signal = target_signal(runner, framings, names, pixels is not None, target, settings.share_starts)
    inputs = tuple(reference.embeds[slice(*reference.spans[n])].unsqueeze(0) for n in names)
    baselines = tuple(torch.zeros_like(x) for x in inputs)
    if pixels is not None:
        inputs += (pixels[0],)
        baselines += (pixels[1],)
    return integrate(signal, inputs, baselines, settings.steps, settings.internal_batch_size)
