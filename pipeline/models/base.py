"""The one interface every supported model sits behind.

Nothing above this module knows which model it talks to. An adapter prepares requests with the
model's own chat template, returns hidden states at chosen decoder layers (the last token's, or
the mean over the request's own tokens), and generates text.

Layer convention: "layer k" is the output of decoder block k, 0-based; in Hugging Face terms
``hidden_states[k + 1]``. The final norm is never applied to a stored state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from pipeline.config import GREEDY, Decoding
from pipeline.config.pooling import LAST
from pipeline.errors import LSIGuardError

# [start, stop) characters of a prompt's text that are the user's own request.
Span = tuple[int, int]


@dataclass(frozen=True)
class Request:
    """One user turn: an optional image and the text typed next to it.

    ``span`` says which characters of ``text`` are the user's own request when the text also
    holds other words (a framing around it); ``None`` means all of it. Mean pooling averages over
    the tokens of those characters (see :data:`~pipeline.config.pooling.POOLINGS`).
    """

    text: str
    image: Path | None = None
    span: Span | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.span is not None:
            start, stop = self.span
            if not 0 <= start <= stop <= len(self.text):
                raise ValueError(f"request span {self.span} lies outside its text of {len(self.text)} characters")

    def request_span(self) -> Span:
        """The characters of ``text`` that are the user's own request."""
        return self.span if self.span is not None else (0, len(self.text))


@dataclass(frozen=True)
class RequestGroup:
    """Several texts asked next to one image: the framings of one request that LSI compares.

    Their prompts share everything up to where the texts differ, which adapters compute once.
    ``spans`` gives each text's :attr:`Request.span` (``None``: every text is all request).
    """

    texts: tuple[str, ...]
    image: Path | None = None
    spans: tuple[Span | None, ...] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.spans is not None and len(self.spans) != len(self.texts):
            raise ValueError(f"{len(self.spans)} request spans for {len(self.texts)} texts")

    def requests(self) -> list[Request]:
        """One :class:`Request` per text, in order."""
        spans = self.spans if self.spans is not None else (None,) * len(self.texts)
        return [Request(text=text, image=self.image, span=span) for text, span in zip(self.texts, spans, strict=True)]


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What identifies a model for provenance checks on activation stores."""

    name: str
    revision: str
    num_layers: int
    hidden_size: int
    dtype: str


class ModelAdapter(Protocol):
    """A vision-language model behind LSI-Guard's interface."""

    info: ModelInfo

    def last_token_states(self, requests: Sequence[Request], layers: Sequence[int]) -> torch.Tensor:
        """Hidden states of the last prompt token for each request.

        Returns a float32 CPU tensor of shape ``(len(requests), len(layers), hidden_size)``;
        entry ``[i, j]`` is the output of decoder block ``layers[j]`` at the last real token of
        request ``i``'s chat-formatted prompt (generation prompt included).
        """
        ...

    def group_states(
        self, groups: Sequence[RequestGroup], layers: Sequence[int], reads: Sequence[str] = (LAST,)
    ) -> torch.Tensor:
        """States ``(len(groups), len(reads) * group_size, len(layers), hidden_size)`` of every text in every group.

        ``reads`` (:data:`~pipeline.config.pooling.READS`) says what is read of each prompt's
        block outputs: ``last``, the last token (equal to :meth:`last_token_states` on the
        flattened requests, within float tolerance), and ``mean``, the average over the tokens of
        the request's own characters (:attr:`Request.span`, and an image's OCR text where the
        model reads one; never template, framing or image tokens). Entry ``[g, r * group_size + k]``
        is read ``reads[r]`` of text ``k``. The part of the prompts a group shares is computed once.
        """
        ...

    def generate(self, requests: Sequence[Request], max_new_tokens: int, decoding: Decoding = GREEDY) -> list[str]:
        """Answers to each request under ``decoding`` (greedy by default), special tokens stripped."""
        ...


@runtime_checkable
class ReadsImagesAhead(Protocol):
    """An adapter whose image reading can run ahead of its forward passes, in worker processes.

    The embedded default reads images with OCR; reading all of a job's images first, several
    at once, is faster than one at a time between forwards, and changes no result.
    """

    def read_images_ahead(self, images: Sequence[Path], workers: int, progress: bool = True) -> int:
        """Read (and cache) the images not read before, ``workers`` at once; returns how many were read."""
        ...


class ModelLoadError(LSIGuardError, RuntimeError):
    """A model folder that is missing, incomplete or of an unsupported architecture."""


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` means the GPU when there is one; anything else is passed to torch as is."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype_name(dtype: str, device: torch.device) -> str:
    """``"auto"`` means float16 on a GPU (half the memory, tensor cores) and float32 on a CPU.

    States are stored as float16 either way; on a CPU half precision is slower, not faster.
    """
    if dtype == "auto":
        return "float16" if device.type == "cuda" else "float32"
    return dtype


def resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for a configuration string, refusing names the store cannot describe."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_layers(layers: Sequence[int], num_layers: int) -> None:
    """Refuse layer indices outside ``[0, num_layers)`` with a message naming them."""
    bad = [k for k in layers if not 0 <= k < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has decoder blocks 0..{num_layers - 1}")
    if not layers:
        raise ValueError("at least one layer must be requested")
