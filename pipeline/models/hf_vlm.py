"""Hugging Face image-text-to-text models behind :class:`ModelAdapter`.

Supported families: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3 and SmolVLM, each as a
local folder in the hub's layout. Prompts go through the processor's own chat template, so the
"last token" is whatever that template ends the generation prompt with (``"ASSISTANT:"`` for
LLaVA-1.5, the newline after ``<|im_start|>assistant`` for Qwen2-VL). Batches are padded on
the left and positions are computed from the attention mask (Qwen's three-axis M-RoPE
positions included), so a request's states do not depend on its neighbours in the batch.

Mean pooling (``extract.pooling: mean``) averages over the request's own text tokens only: an
image's tokens (and the tokens a processor adds around them) are the image, not the user's
request text, and are left out, as are the chat template's and the framing's tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText, BatchFeature, ProcessorMixin

from pipeline.config import DEFAULT_LIMITS
from pipeline.config.pooling import LAST
from pipeline.images import load_image
from pipeline.models.base import (
    GREEDY,
    Decoding,
    ModelInfo,
    ModelLoadError,
    Request,
    RequestGroup,
    check_layers,
    resolve_device,
    resolve_dtype,
    resolve_dtype_name,
)
from pipeline.models.decoding import generate_kwargs, random_state
from pipeline.models.forward import grouped_states, single_pass_states
from pipeline.models.hooks import find_decoder_layers, position_ids_from_mask
from pipeline.models.literal import (
    added_token_strings,
    check_length,
    contains_added_token,
    plain_ids,
    spare_token,
    splice_batch,
    split_prompt,
)
from pipeline.models.processors import load_processor
from pipeline.models.request_tokens import aligned_mask, ids_and_request_mask

# model_type in config.json -> what it is. Only architectures whose chat template, image
# handling and decoder layout have been checked end to end belong here.
SUPPORTED: dict[str, str] = {
    "llava": "LLaVA-1.5 in llava-hf format (e.g. llava-hf/llava-1.5-7b-hf)",
    "llava_next": "LLaVA-NeXT in llava-hf format (e.g. llava-hf/llava-v1.6-mistral-7b-hf)",
    "qwen2_vl": "Qwen2-VL (e.g. Qwen/Qwen2-VL-7B-Instruct)",
    "qwen2_5_vl": "Qwen2.5-VL (e.g. Qwen/Qwen2.5-VL-7B-Instruct)",
    "idefics3": "Idefics3 (e.g. HuggingFaceM4/Idefics3-8B-Llama3)",
    "smolvlm": "SmolVLM (e.g. HuggingFaceTB/SmolVLM-Instruct)",
}
# Families whose rotary positions have three axes (time, height, width) for image tokens.
MROPE_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl"})

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Files whose content decides what a prompt looks like; cheap to hash, unlike the weights.
PROMPT_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json")
DEFAULT_BATCH_SIZE = 8


def _how_to_get_a_model(folder: Path) -> str:
    """The fix for a missing model, spelled out for a user without network at run time."""
    return (
        f"On a machine with network run `hf download llava-hf/llava-1.5-7b-hf --local-dir {folder}` "
        "(or copy such a folder here), then point params.yaml model.path at it."
    )


def read_model_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a local model folder, or :class:`ModelLoadError` saying what is wrong."""
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist. {_how_to_get_a_model(folder)}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"model folder {folder} has no config.json, so it is not a Hugging Face model folder. "
            f"{_how_to_get_a_model(folder)}"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file} is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} does not hold a JSON object")
    return config


def check_supported(config: dict[str, Any], folder: Path) -> str:
    """Return the config's ``model_type`` if this adapter supports it, else raise :class:`ModelLoadError`."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        supported = ", ".join(f"'{name}' ({what})" for name, what in SUPPORTED.items())
        raise ModelLoadError(
            f"model in {folder} has model_type {model_type!r}, which this adapter does not support; "
            f"supported: {supported}"
        )
    return str(model_type)


def model_revision(folder: Path) -> str:
    """A short fingerprint of a model folder: config and prompt files by content, weights by name and size.

    Hashing gigabytes of weights on every load would cost minutes; a changed checkpoint
    practically always changes a file's size or name, or the config beside it.
    """
    digest = hashlib.sha256()
    for name in ("config.json", *PROMPT_FILES):
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:12]


def _text_config(model: nn.Module) -> Any:
    """The language model's config: nested as ``text_config`` in multimodal configs."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config.text_config


def _image_token_ids(config: Any) -> frozenset[int]:
    """Ids of the tokens that image features replace, as the model's config names them."""
    ids = set()
    for name in ("image_token_id", "image_token_index", "video_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.add(value)
    return frozenset(ids)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class HFVisionLanguageAdapter:
    """A local Hugging Face image-text-to-text model and its processor, behind :class:`ModelAdapter`."""

    def __init__(
        self,
        *,
        model: nn.Module,
        processor: ProcessorMixin,
        info: ModelInfo,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_request_tokens: int | None = DEFAULT_LIMITS.max_request_tokens,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.info = info
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        tokenizer = processor.tokenizer  # type: ignore[attr-defined]
        # Left padding puts every row's last prompt token in the last column, which is also
        # where generation continues from.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.blocks = find_decoder_layers(model, info.num_layers)
        self.image_token_ids = _image_token_ids(model.config)
        self.model_type = str(model.config.model_type)
        self.max_request_tokens = max_request_tokens
        self.added_tokens = added_token_strings(tokenizer)

    @classmethod
    def from_folder(
        cls,
        path: Path,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_request_tokens: int | None = DEFAULT_LIMITS.max_request_tokens,
    ) -> HFVisionLanguageAdapter:
        """Load model and processor from a local folder, with no network access.

        Requests whose text is longer than ``max_request_tokens`` tokens are refused.
        """
        folder = Path(path).expanduser()
        config = read_model_config(folder)
        check_supported(config, folder)
        torch_device = resolve_device(device)
        dtype = resolve_dtype_name(dtype, torch_device)
        torch_dtype = resolve_dtype(dtype)
        processor = load_processor(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch_dtype)
        model.to(torch_device).eval()
        text_config = _text_config(model)
        info = ModelInfo(
            name=folder.resolve().name or str(config.get("_name_or_path", folder)),
            revision=model_revision(folder),
            num_layers=int(text_config.num_hidden_layers),
            hidden_size=int(text_config.hidden_size),
            dtype=dtype,
        )
        return cls(
            model=model, processor=processor, info=info, batch_size=batch_size, max_request_tokens=max_request_tokens
        )

    def _messages(self, request: Request) -> list[dict[str, Any]]:
        """One user turn in the content-list form that multimodal chat templates expect."""
        content: list[dict[str, str]] = []
        if request.image is not None:
            content.append({"type": "image"})
        content.append({"type": "text", "text": request.text})
        return [{"role": "user", "content": content}]

    def render(self, request: Request, text: str) -> str:
        """The chat-formatted prompt for ``request`` with ``text`` as its text, before image expansion."""
        messages = self._messages(Request(text=text, image=request.image))
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def prompt_text(self, request: Request) -> str:
        """The chat-formatted prompt for ``request``, generation prompt included, before image expansion."""
        return self.render(request, request.text)

    def encode(self, requests: Sequence[Request], request_masks: bool = False) -> BatchFeature:
        """Tokenise a batch (left-padded) with its images, on the model's device and dtype.

        Images go to the processor as one list per prompt (empty for a prompt without an image),
        the one form every supported processor splits correctly; ``None`` when no prompt has one.
        A request's text is read as plain text: added-token strings in it (``<image>``,
        ``<|im_end|>``) stay characters (see :mod:`pipeline.models.literal`). Raises
        :class:`~pipeline.models.literal.RequestTooLong` for a text over ``max_request_tokens``.
        With ``request_masks`` the batch also holds ``request_mask``: 1 at the tokens of the
        request's own characters (:attr:`Request.span`), never at image or template tokens,
        padded like the ids; it is no model input.
        """
        texts: list[str] = []
        replacements: dict[int, tuple[int, list[int]]] = {}
        for i, request in enumerate(requests):
            check_length(len(plain_ids(self.tokenizer, request.text)), self.max_request_tokens, "the request")
            if not contains_added_token(request.text, self.added_tokens):
                texts.append(self.prompt_text(request))
                continue
            parts = split_prompt(lambda text, request=request: self.render(request, text), request.text)
            spare, spare_id = spare_token(self.tokenizer, parts.prefix + parts.suffix, self.image_token_ids)
            texts.append(parts.prefix + spare + parts.suffix)
            replacements[i] = (spare_id, plain_ids(self.tokenizer, parts.content))
        images: list[list[Image.Image]] = [[load_image(r.image)] if r.image is not None else [] for r in requests]
        batch = self.processor(
            text=texts,
            images=images if any(images) else None,
            return_tensors="pt",
            padding=True,
        )
        if replacements:
            batch = splice_batch(batch, replacements, self.pad_token_id)
        if request_masks:
            batch["request_mask"] = self._request_masks(requests, batch)
        batch = batch.to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    def _request_masks(self, requests: Sequence[Request], batch: BatchFeature) -> torch.Tensor:
        """The request's own tokens of each row of a left-padded ``batch``: ``(batch, seq)`` 0/1.

        Found on the prompt as the tokenizer reads it before the processor expands the image
        (:mod:`pipeline.models.request_tokens`), then moved onto the processor's row, whose tokens
        after the image are the same.
        """
        ids, attention = batch["input_ids"], batch["attention_mask"]
        masks = torch.zeros_like(ids, dtype=torch.long)
        for i, request in enumerate(requests):
            text_ids, text_mask = ids_and_request_mask(
                self.tokenizer,
                lambda text, request=request: self.render(request, text),
                request.text,
                [request.request_span()],
                self.added_tokens,
                self.image_token_ids,
            )
            real = attention[i].bool()
            row = aligned_mask(ids[i][real].tolist(), text_ids, text_mask)
            masks[i, real] = torch.tensor(row, dtype=torch.long)
        return masks

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Positions counted from each row's first real token, so left padding changes nothing.

        Qwen2-VL and Qwen2.5-VL get their model's own three-axis positions ``(3, batch, seq)``.
        """
        if self.model_type not in MROPE_FAMILIES:
            return position_ids_from_mask(attention_mask)
        image_mask = torch.zeros_like(input_ids, dtype=torch.int)
        for token in self.image_token_ids:
            image_mask |= (input_ids == token).int()
        positions, _ = self.model.model.get_rope_index(
            input_ids,
            image_mask,
            image_grid_thw=image_inputs.get("image_grid_thw"),
            attention_mask=attention_mask,
        )
        return positions

    @torch.inference_mode()
    def last_token_states(self, requests: Sequence[Request], layers: Sequence[int]) -> torch.Tensor:
        """Outputs of decoder blocks ``layers`` at each request's last prompt token.

        Returns float32 CPU ``(len(requests), len(layers), hidden_size)``; the forward stops
        after block ``max(layers)``.
        """
        layers = list(layers)
        check_layers(layers, self.info.num_layers)
        if not requests:
            return torch.empty(0, len(layers), self.info.hidden_size)
        return torch.cat([single_pass_states(self, chunk, layers) for chunk in _chunks(requests, self.batch_size)])

    @torch.inference_mode()
    def group_states(
        self, groups: Sequence[RequestGroup], layers: Sequence[int], reads: Sequence[str] = (LAST,)
    ) -> torch.Tensor:
        """States of every text of every group, read as ``reads`` says; each group's shared prefix (image included)
        runs once. See :meth:`~pipeline.models.base.ModelAdapter.group_states`."""
        layers = list(layers)
        check_layers(layers, self.info.num_layers)
        if not groups:
            return torch.empty(0, 0, len(layers), self.info.hidden_size)
        return torch.cat([grouped_states(self, chunk, layers, reads) for chunk in _chunks(groups, self.batch_size)])

    def _stop_ids(self) -> set[int]:
        """Token ids that end an answer: the generation config's eos ids and the pad id."""
        eos = self.model.generation_config.eos_token_id
        ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if self.tokenizer.pad_token_id is not None:
            ids.add(self.tokenizer.pad_token_id)
        return ids

    @torch.inference_mode()
    def generate_token_ids(
        self, requests: Sequence[Request], max_new_tokens: int, decoding: Decoding = GREEDY
    ) -> list[list[int]]:
        """New tokens per request under ``decoding``, cut before the first end-of-sequence or pad token."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        stop = self._stop_ids()
        answers: list[list[int]] = []
        with random_state(decoding, self.device):
            for chunk in _chunks(requests, self.batch_size):
                answers.extend(self._generate_chunk(chunk, max_new_tokens, decoding, stop))
        return answers

    def _generate_chunk(
        self, chunk: Sequence[Request], max_new_tokens: int, decoding: Decoding, stop: set[int]
    ) -> list[list[int]]:
        batch = self.encode(chunk)
        output = self.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            **generate_kwargs(decoding),
        )
        # With left padding every prompt ends at the same column, so new tokens start there.
        new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
        return [row[: next((i for i, token in enumerate(row) if token in stop), len(row))] for row in new_tokens]

    def generate(self, requests: Sequence[Request], max_new_tokens: int, decoding: Decoding = GREEDY) -> list[str]:
        """Answers under ``decoding`` (greedy by default), new tokens only, special tokens stripped, in order."""
        ids = self.generate_token_ids(requests, max_new_tokens, decoding)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
