"""A training-free refusal score read from hidden states through the logit lens (HiddenDetect-style).

HiddenDetect (Jiang et al., 2025, "HiddenDetect: Detecting Jailbreak Attacks against Large
Vision-Language Models via Monitoring Hidden States") projects each layer's last-token state to
vocabulary logits with the model's own final norm and LM head, and measures how strongly those
logits point at refusal tokens ("sorry", "cannot", ...): the cosine similarity with a multi-hot
"refusal vector". Summed over a range of layers, it rises when the model is inclined to refuse,
so a higher score means "more likely harmful" and feeds AUROC directly. Nothing is trained.

The store holds raw block outputs (no final norm), so the norm is applied here, once, at every
layer, as the model itself does for its last block.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.config.pooling import MEAN, read_name

if TYPE_CHECKING:  # for annotations only: the guard needs no zarr or dask at run time
    from pipeline.detect.store import ActivationStore

# Attributes under which decoders keep their final norm (Llama/Qwen/Mistral, Phi, GPT-2 style).
NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")
# Where multimodal wrappers keep their text decoder, when ``get_decoder`` is not available.
DECODER_PATHS = (("language_model",), ("model", "language_model"), ("model", "text_model"), ("model",))
# cosine_similarity's default guard against a zero-length logit vector.
COSINE_EPS = 1e-8


@dataclass(frozen=True, kw_only=True)
class RefusalReadout:
    """What the logit lens needs from a model, on the CPU in float32, detached from the model.

    ``norm`` is a copy of the text decoder's final norm module, ``unembedding`` the LM head's
    weight ``(vocab, hidden)``, ``token_ids`` the refusal vector's non-zero entries and ``words``
    the refusal words they came from.
    """

    norm: nn.Module
    unembedding: torch.Tensor
    token_ids: tuple[int, ...]
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.unembedding.ndim != 2:
            raise ValueError(f"unembedding must be (vocab, hidden), got shape {tuple(self.unembedding.shape)}")
        if self.unembedding.dtype != torch.float32:
            raise ValueError(f"unembedding must be float32, got {self.unembedding.dtype}")
        if not self.token_ids:
            raise ValueError("the refusal vector needs at least one token id")
        vocab = self.unembedding.shape[0]
        outside = [i for i in self.token_ids if not 0 <= i < vocab]
        if outside:
            raise ValueError(f"refusal token ids {outside} are outside the LM head's vocabulary of {vocab}")

    @property
    def hidden_size(self) -> int:
        """Width of the states the readout accepts."""
        return int(self.unembedding.shape[1])


def _first_piece(tokenizer: Any, text: str) -> int | None:
    """Id of the first token of ``text`` that carries a visible character, or None when there is none.

    SentencePiece tokenizers may open a space-prefixed word with a bare "▁" token: that piece says
    nothing about the word, so it is skipped.
    """
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        if tokenizer.decode([token_id]).strip():
            return int(token_id)
    return None


def refusal_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[int, ...]:
    """Sorted, deduplicated first-token ids of each word, with and without a leading space.

    A word's first token is where a refusal would begin ("Sorry" at the start of an answer,
    " sorry" inside one), which is what the logit lens at the last prompt token can show.
    """
    if not words:
        raise ValueError("no refusal words given")
    ids: set[int] = set()
    for word in words:
        pieces = [_first_piece(tokenizer, text) for text in (word, " " + word)]
        found = [piece for piece in pieces if piece is not None]
        if not found:
            raise ValueError(f"refusal word {word!r} tokenises to no visible token")
        ids.update(found)
    return tuple(sorted(ids))


def _attribute_path(model: nn.Module, path: Sequence[str]) -> nn.Module | None:
    module: Any = model
    for name in path:
        module = getattr(module, name, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def _final_norm(model: nn.Module) -> nn.Module:
    """The text decoder's final norm, for causal LMs and image-text-to-text wrappers alike."""
    decoders: list[nn.Module] = []
    if hasattr(model, "get_decoder"):
        decoders.append(model.get_decoder())
    decoders.extend(d for d in (_attribute_path(model, path) for path in DECODER_PATHS) if d is not None)
    for decoder in decoders:
        for name in NORM_NAMES:
            norm = getattr(decoder, name, None)
            if isinstance(norm, nn.Module):
                return norm
    tried = ", ".join(type(d).__name__ for d in decoders) or "none found"
    raise ValueError(
        f"{type(model).__name__}: cannot find the text decoder's final norm (looked for {', '.join(NORM_NAMES)} "
        f"on decoders: {tried})"
    )


def readout_from_adapter(adapter: Any, words: Sequence[str]) -> RefusalReadout:
    """The final norm, LM head and refusal token ids of an embedded or Hugging Face VLM adapter.

    Weights are copied to float32 on the CPU, so the adapter (and its GPU memory) can be freed.
    """
    model: nn.Module = adapter.model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__}: the model has no output embeddings (LM head) to read logits with")
    unembedding = head.weight.detach().to(device="cpu", dtype=torch.float32).clone()
    hidden = int(adapter.info.hidden_size)
    if unembedding.shape[1] != hidden:
        raise ValueError(
            f"{type(model).__name__}: LM head is {tuple(unembedding.shape)}, expected (vocab, {hidden}) "
            "for the text decoder's hidden size"
        )
    norm = copy.deepcopy(_final_norm(model)).to(device="cpu", dtype=torch.float32).eval()
    norm.requires_grad_(False)
    tokenizer = getattr(adapter, "tokenizer", None) or adapter.processor.tokenizer
    return RefusalReadout(
        norm=norm,
        unembedding=unembedding,
        token_ids=refusal_token_ids(tokenizer, words),
        words=tuple(words),
    )


def _refusal_cosine(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each logit row with the multi-hot vector over ``token_ids``.

    The multi-hot vector is never built: its dot product is a sum of the selected logits and
    its length is the square root of their count.
    """
    dot = logits[:, token_ids].sum(dim=1)
    lengths = logits.norm(dim=1) * math.sqrt(len(token_ids))
    return dot / lengths.clamp_min(COSINE_EPS)


def layer_similarities(states: np.ndarray | torch.Tensor, readout: RefusalReadout, chunk_rows: int = 256) -> np.ndarray:
    """Refusal cosine per request and layer: states ``(n, L, hidden)`` -> ``(n, L)`` float64.

    ``states`` are raw block outputs (no final norm). The ``n * L`` states go through norm and
    LM head ``chunk_rows`` at a time, so at most ``chunk_rows x vocab`` logits exist at once.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    tensor = torch.as_tensor(states)
    if tensor.ndim != 3 or tensor.shape[2] != readout.hidden_size:
        raise ValueError(f"states must be (n, layers, {readout.hidden_size}), got shape {tuple(tensor.shape)}")
    n, num_layers, hidden = tensor.shape
    flat = tensor.reshape(n * num_layers, hidden)
    token_ids = torch.tensor(readout.token_ids, dtype=torch.long)
    similarities = torch.empty(n * num_layers, dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, n * num_layers, chunk_rows):
            block = flat[start : start + chunk_rows].to(device="cpu", dtype=torch.float32)
            if not torch.isfinite(block).all():
                bad = start + int((~torch.isfinite(block)).any(dim=1).nonzero()[0, 0])
                raise ValueError(f"non-finite state at row {bad // num_layers}, layer position {bad % num_layers}")
            logits = readout.norm(block) @ readout.unembedding.T
            similarities[start : start + len(block)] = _refusal_cosine(logits, token_ids)
    return similarities.reshape(n, num_layers).numpy().astype(np.float64)


def refusal_scores(similarities: np.ndarray, stored_layers: Sequence[int], use_layers: Sequence[int]) -> np.ndarray:
    """Sum of the refusal cosines over ``use_layers`` (empty: all stored layers): higher = more refusal-like.

    ``similarities`` is ``(n, len(stored_layers))``, columns in ``stored_layers`` order.
    """
    similarities = np.asarray(similarities, dtype=np.float64)
    stored = [int(layer) for layer in stored_layers]
    if similarities.ndim != 2 or similarities.shape[1] != len(stored):
        raise ValueError(
            f"similarities must be (n, {len(stored)}) for stored layers {stored}, got shape {similarities.shape}"
        )
    wanted = sorted({int(layer) for layer in use_layers}) if len(use_layers) else stored
    missing = [layer for layer in wanted if layer not in stored]
    if missing:
        raise ValueError(f"refusal layers {missing} are not among the stored layers {stored}")
    columns = [stored.index(layer) for layer in wanted]
    return similarities[:, columns].sum(axis=1)


def store_similarities(store: ActivationStore, readout: RefusalReadout, framing: str = "plain") -> np.ndarray:
    """:func:`layer_similarities` of one framing at every stored layer, ``(rows, layers)`` in store row order.

    The framing's last-token state; a store of mean-pooled states only (``extract.pooling: mean``)
    gives its mean over the request's tokens instead. The store is read one shard at a time, so its
    states never all sit in memory.
    """
    variants = list(store.provenance.variants)
    if framing not in variants and read_name(framing, MEAN) in variants:
        framing = read_name(framing, MEAN)
    if framing not in variants:
        raise ValueError(f"{store.path}: unknown framing {framing!r}; the store holds {', '.join(variants)}")
    layers = list(store.provenance.layers)
    lazy = store.layer_states(layers)[:, variants.index(framing)]
    blocks = []
    for start, end in store.shard_blocks():
        block = np.asarray(lazy[start:end].compute(), dtype=np.float32)
        if np.isnan(block).any():
            raise ValueError(f"{store.path}: NaN states (unwritten rows) in rows {start}..{end - 1}")
        blocks.append(layer_similarities(block, readout))
    return np.concatenate(blocks, axis=0) if blocks else np.zeros((0, len(layers)))


def store_refusal_scores(store: ActivationStore, readout: RefusalReadout, use_layers: Sequence[int]) -> np.ndarray:
    """The refusal-direction score of every store row (its plain framing): :func:`refusal_scores` of
    :func:`store_similarities` over ``use_layers`` (empty: every stored layer)."""
    return refusal_scores(store_similarities(store, readout), list(store.provenance.layers), use_layers)
