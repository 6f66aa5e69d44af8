"""One request, one prefix: the LSI check and the answer share a single KV cache.

A guarded request runs three prompts that differ only at the end: the benign and malicious
framings the probe reads, and the plain request the model answers. Their common start (system
prompt, chat header, image tokens or the image's OCR text, any common start of the text) is run
once, through every decoder block, into a KV cache:

- the check packs the two framings' tails behind that cache (one row, block-diagonal mask,
  positions restarting after the prefix, as :func:`pipeline.models.forward.grouped_states`
  does) and stops after the deepest block the probe reads;
- the answer continues the plain prompt's tail from the same cache and decodes greedily.

So the check adds only the framings' short tails to the work the answer needs anyway, and an
answered request never encodes its image or its prefix twice. A detector that reads means over
the request's tokens gets them too: the prefix forward sums the request's tokens it holds (built
with ``mean_layers``), the check adds each framing's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from pipeline.config.pooling import LAST, MEAN
from pipeline.errors import LSIGuardError
from pipeline.models.base import Request, Span, check_layers
from pipeline.models.forward import (
    ForwardModel,
    _by_read,
    _check_counts,
    _encode,
    _image_tokens,
    _means,
    _unpadded,
    _unpadded_masks,
    check_reads,
    image_inputs_of,
)
from pipeline.models.hooks import read_layers, run_to_layers, token_reader, weighted_sum_reader
from pipeline.models.prefix_cache import CachedPrefix, reusable_prefix, template_length
from pipeline.models.prefix_forward import (
    first_one,
    pack_tails,
    packed_attention_mask,
    prefix_weights,
    shared_prefix_length,
    tail_positions,
    tail_weights,
)


class PrefixNotShared(LSIGuardError, ValueError):
    """The prompts do not share their image tokens (a template that puts the image after the text)."""


def supports_prefix_sessions(adapter: object) -> bool:
    """True for adapters that expose the forward-level hooks a :class:`PrefixSession` needs."""
    needed = ("model", "blocks", "encode", "position_ids", "pad_token_id", "image_token_ids", "tokenizer")
    return all(hasattr(adapter, name) for name in needed)


def stop_token_ids(model: torch.nn.Module, tokenizer: object) -> set[int]:
    """Token ids that end an answer: the generation config's end-of-sequence ids, the tokenizer's, and its pad id."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos) if isinstance(eos, list) else ({int(eos)} if eos is not None else set())
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return ids


@dataclass
class SessionTimings:
    """Seconds spent in each part of a session (zero for a part never run)."""

    prefix: float = 0.0
    check: float = 0.0
    answer: float = 0.0


class PrefixSession:
    """The prompts of one request (framings first, the answered prompt last) over one shared, cached prefix.

    The prefix forward runs in the constructor. :meth:`states` reads the framings' last-token
    states; :meth:`answer` decodes the last prompt. ``answer`` extends the cache in place, so it
    may be called once; ``states`` leaves the cache as it found it.
    """

    def __init__(
        self,
        adapter: ForwardModel,
        texts: Sequence[str],
        image: Path | None,
        *,
        spans: Sequence[Span | None] | None = None,
        mean_layers: Sequence[int] = (),
    ) -> None:
        if len(texts) < 2:
            raise ValueError("a session needs at least one framing and the prompt to answer")
        self.adapter = adapter
        self.timings = SessionTimings()
        self._answered = False
        self.finish_reason: str | None = None  # how the answer ended: stop, length or cancelled
        self.answer_token_ids: list[int] = []
        started = time.perf_counter()
        spans = spans if spans is not None else [None] * len(texts)
        requests = [Request(text=text, image=image, span=span) for text, span in zip(texts, spans, strict=True)]
        self.mean_layers = list(mean_layers)
        encoded = [_encode(adapter, [request], bool(self.mean_layers)) for request in requests]
        batches = [batch for batch, _ in encoded]
        image_inputs = image_inputs_of(batches[0])
        self.sequences = [_unpadded(batch)[0] for batch in batches]
        self.prefix_length = shared_prefix_length(self.sequences)
        if any(_image_tokens(seq[self.prefix_length :], adapter.image_token_ids) for seq in self.sequences):
            raise PrefixNotShared("the prompts differ before the image tokens end; the prefix cannot be shared")
        device = batches[0]["input_ids"].device
        self.device = device
        prefix = torch.tensor([self.sequences[0][: self.prefix_length]], dtype=torch.long, device=device)
        self.prefix_mask = torch.ones_like(prefix)
        self.prefix_positions = adapter.position_ids(prefix, self.prefix_mask, image_inputs)
        self.cache = DynamicCache(config=adapter.model.config)
        # The framings' request masks (mean reads only), and their sums over the prefix's request tokens.
        self.masks: list[list[int]] = []
        self.prefix_sums: torch.Tensor | None = None
        if self.mean_layers:
            check_layers(self.mean_layers, adapter.info.num_layers)
            self.masks = [_unpadded_masks(batch, mask)[0] for batch, mask in encoded[:-1]]
            _check_counts([sum(mask) for mask in self.masks], list(texts[:-1]))
        # The start every request shares comes from the adapter's prefix cache; only the rest runs here.
        entry = self._cached_start(requests)
        start = 0 if entry is None else len(entry.tokens)
        if entry is not None:
            entry.seed(self.cache, 1)
        self.reused_tokens = start

        def prefix_forward() -> object:
            # Every block runs: the answer needs the whole cache. Only one position's logits are kept.
            return adapter.model(
                input_ids=prefix[:, start:],
                attention_mask=self.prefix_mask,
                position_ids=self.prefix_positions[..., start:],
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
                **image_inputs,
            )

        with torch.inference_mode():
            if start == self.prefix_length:  # the shared prefix is the cached start itself
                if self.mean_layers:
                    hidden = adapter.info.hidden_size
                    self.prefix_sums = torch.zeros(len(self.masks), len(self.mean_layers), hidden)
            elif self.mean_layers:
                weights = prefix_weights([self.masks], [self.prefix_length], self.prefix_length)[..., start:]
                reader = weighted_sum_reader(weights)
                (self.prefix_sums,) = read_layers(
                    prefix_forward, adapter.blocks, self.mean_layers, [reader], stop=False
                )
            else:
                prefix_forward()
        self.timings.prefix = time.perf_counter() - started

    def _cached_start(self, requests: Sequence[Request]) -> CachedPrefix | None:
        """The adapter's cached start this session's prefix begins with (built on first use), or None."""
        limit = self.prefix_length
        if self.masks:
            limit = min([limit, *(first_one(mask) for mask in self.masks)])

        def template_lengths() -> list[int]:
            masks = [_unpadded_masks(*_encode(self.adapter, [request], True))[0] for request in requests]
            image_ids = self.adapter.image_token_ids
            return [min(template_length(seq, mask, image_ids) for seq, mask in zip(self.sequences, masks, strict=True))]

        return reusable_prefix(self.adapter, [self.sequences[0]], limit, template_lengths, self.device)

    def states(self, layers: Sequence[int], reads: Sequence[str] = (LAST,)) -> torch.Tensor:
        """States ``(len(reads) * n_framings, len(layers), hidden)`` of every prompt but the last, float32 on CPU.

        Entry ``r * n_framings + k`` is read ``reads[r]`` of framing ``k``: its last token's state, or
        (``mean``, for a session built with ``mean_layers`` equal to ``layers``) the average over the
        request's own tokens.
        """
        layers = list(layers)
        check_layers(layers, self.adapter.info.num_layers)
        reads = check_reads(reads)
        if MEAN in reads and layers != self.mean_layers:
            raise ValueError(f"mean reads need the session built with mean_layers={layers}, not {self.mean_layers}")
        started = time.perf_counter()
        framings = self.sequences[:-1]
        packed, segments, last = pack_tails([framings], [self.prefix_length])
        ids = torch.tensor(packed, dtype=torch.long, device=self.device)
        segments = segments.to(self.device)
        real = (segments >= 0).long()
        mask = packed_attention_mask(self.prefix_mask, segments, self.adapter.model.dtype)
        positions = tail_positions(self.prefix_positions, segments, real)
        # A view of the cached blocks the check reads: the forward appends the tails' keys and
        # values to the view's own tensors, never to the session's cache.
        deepest = max(layers)
        view = DynamicCache([(layer.keys, layer.values) for layer in self.cache.layers[: deepest + 1]])

        def forward() -> object:
            return self.adapter.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=view, use_cache=True
            )

        with torch.inference_mode():
            rows = torch.zeros_like(last)  # every tail sits in the one packed row
            if reads == (LAST,):
                states = run_to_layers(forward, self.adapter.blocks, layers, last_positions=last, rows=rows)
            else:
                states = self._read(forward, layers, reads, rows, last, ids.shape[1])
        self.timings.check += time.perf_counter() - started
        return states

    def _read(
        self,
        forward: Callable[[], object],
        layers: list[int],
        reads: tuple[str, ...],
        rows: torch.Tensor,
        last: torch.Tensor,
        width: int,
    ) -> torch.Tensor:
        """The tail forward's reads, means completed with the prefix's sums: ``(reads * framings, layers, hidden)``."""
        assert self.prefix_sums is not None
        readers = [token_reader(rows, last)] if LAST in reads else []
        readers.append(weighted_sum_reader(tail_weights([self.masks], [self.prefix_length], width)))
        found = _by_read(reads, read_layers(forward, self.adapter.blocks, layers, readers))
        found[MEAN] = _means(self.prefix_sums + found[MEAN], [sum(mask) for mask in self.masks])
        return torch.cat([found[read] for read in reads])

    @property
    def completion_tokens(self) -> int:
        """Tokens the answer has decoded so far (an end-of-answer token is not counted)."""
        return len(self.answer_token_ids)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the answered prompt (the plain request in the model's chat template, image tokens included)."""
        return len(self.sequences[-1])

    def answer(self, max_new_tokens: int, stop_at_eos: bool = True) -> str:
        """Greedy answer to the last prompt, continued from the cached prefix; special tokens stripped.

        ``stop_at_eos=False`` always decodes ``max_new_tokens`` tokens (benchmarks time a fixed length).
        Afterwards :attr:`finish_reason` and :attr:`completion_tokens` say how it ended.
        """
        for _ in self.answer_pieces(max_new_tokens, stop_at_eos):
            pass
        return self.answer_text()

    def answer_text(self) -> str:
        """The answer decoded so far, at once, special tokens and surrounding whitespace stripped."""
        tokenizer = self.adapter.tokenizer  # type: ignore[attr-defined]
        return tokenizer.decode(self.answer_token_ids, skip_special_tokens=True).strip()

    def answer_pieces(
        self,
        max_new_tokens: int,
        stop_at_eos: bool = True,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """The greedy answer as it is decoded: one piece of text per token that completes a character.

        The pieces join to the answer (leading whitespace dropped; :meth:`answer` also strips the
        end; a tokenizer that rewrites earlier text as later tokens come can leave the streamed
        text a few spaces from :meth:`answer`'s). ``cancelled`` is asked before every token: once
        it returns True decoding stops, with :attr:`finish_reason` ``cancelled``. Otherwise
        :attr:`finish_reason` is ``stop`` (an end-of-answer token) or ``length`` (``max_new_tokens``
        reached), set when the iterator ends.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if self._answered:
            raise RuntimeError("a session answers once: its cache now holds the answer")
        self._answered = True
        return self._decode(max_new_tokens, stop_at_eos, cancelled)

    def _decode(self, max_new_tokens: int, stop_at_eos: bool, cancelled: Callable[[], bool] | None) -> Iterator[str]:
        started = time.perf_counter()
        model, tokenizer = self.adapter.model, self.adapter.tokenizer  # type: ignore[attr-defined]
        stop = stop_token_ids(model, tokenizer)
        tail = self.sequences[-1][self.prefix_length :]
        ids = torch.tensor([tail], dtype=torch.long, device=self.device)
        segments = torch.zeros_like(ids)
        positions = tail_positions(self.prefix_positions, segments, torch.ones_like(ids))
        length = self.prefix_length + len(tail)
        new_tokens = self.answer_token_ids
        sent = ""  # the decoded text already handed out
        self.finish_reason = "length"
        try:
            for _ in range(max_new_tokens):
                if cancelled is not None and cancelled():
                    self.finish_reason = "cancelled"
                    return
                with torch.inference_mode():
                    output = model(
                        input_ids=ids,
                        attention_mask=torch.ones(1, length, dtype=torch.long, device=self.device),
                        position_ids=positions,
                        cache=self.cache,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                token = int(output.logits[0, -1].argmax())
                if stop_at_eos and token in stop:
                    self.finish_reason = "stop"
                    break
                new_tokens.append(token)
                # Decoding the whole answer each time keeps multi-token characters whole: a piece
                # ending in U+FFFD is an unfinished character, held back until its next token.
                text = tokenizer.decode(new_tokens, skip_special_tokens=True).lstrip()  # type: ignore[attr-defined]
                if not text.endswith("\ufffd") and len(text) > len(sent) and text.startswith(sent):
                    piece, sent = text[len(sent) :], text
                    yield piece
                ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
                positions = positions[..., -1:] + 1
                length += 1
            text = tokenizer.decode(new_tokens, skip_special_tokens=True).lstrip()  # type: ignore[attr-defined]
            if len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent) :]
        finally:
            self.timings.answer = time.perf_counter() - started
