"""Loading a model folder's processor offline, including where transformers would need torchvision.

transformers 5 builds every video processor on torchvision, and refuses to load a processor
that declares one (Qwen2-VL, Qwen2.5-VL, SmolVLM) without it, even for images only
(huggingface/transformers#48558). LSI-Guard works on images, so such processors are loaded as
image-only variants of the same class.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoProcessor, ProcessorMixin
from transformers.utils import is_torchvision_available

_BASE_PROCESSOR_PARAMS = {"self", "image_processor", "tokenizer", "video_processor", "chat_template", "kwargs"}


class NoVideoProcessor:
    """Stands in for the video processor of an image-only processor.

    SmolVLM's ``apply_chat_template`` reads its frame-sampling defaults even for images.
    """

    num_frames = None
    fps = None

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("this processor was loaded without torchvision and cannot process videos")


def image_only_processor_class(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_class`` without its video processor, for use without torchvision.

    transformers 5 builds every video processor on torchvision and refuses to construct or load
    a processor that declares one (Qwen2-VL, Qwen2.5-VL, SmolVLM) when torchvision is missing,
    even for images only. :class:`ProcessorMixin` reads its sub-processors from the ``__init__``
    signature (and its other settings from the ``__init__`` code's argument names), so the
    subclass's ``__init__`` simply lacks ``video_processor`` and passes ``None`` on. It keeps the
    class name, so what it saves reads as the original class. Images and text work unchanged.
    """
    init = processor_class.__init__
    extra = set(inspect.signature(init).parameters) - _BASE_PROCESSOR_PARAMS
    if not extra:

        def __init__(
            self: ProcessorMixin,
            image_processor: Any = None,
            tokenizer: Any = None,
            chat_template: str | None = None,
            **kwargs: Any,
        ) -> None:
            init(
                self,
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kwargs,
            )
            self.video_processor = NoVideoProcessor()

    elif extra == {"image_seq_len"}:  # SmolVLM

        def __init__(  # type: ignore[misc]
            self: ProcessorMixin,
            image_processor: Any = None,
            tokenizer: Any = None,
            image_seq_len: int = 169,
            chat_template: str | None = None,
            **kwargs: Any,
        ) -> None:
            init(
                self,
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                image_seq_len=image_seq_len,
                chat_template=chat_template,
                **kwargs,
            )
            self.video_processor = NoVideoProcessor()

    else:
        raise NotImplementedError(f"no image-only variant of {processor_class.__name__} (settings {sorted(extra)})")
    return type(
        processor_class.__name__,
        (processor_class,),
        {"__init__": __init__, "__module__": processor_class.__module__, "__qualname__": processor_class.__qualname__},
    )


def _needs_image_only(processor_class: type[ProcessorMixin]) -> bool:
    return "video_processor" in processor_class.get_attributes() and not is_torchvision_available()


def load_processor(folder: Path) -> ProcessorMixin:
    """The processor of a local model folder, offline; image-only where a video processor cannot be built.

    Equivalent to ``AutoProcessor.from_pretrained(folder, local_files_only=True)`` except when
    the folder's processor class declares a video processor and torchvision is not installed
    (see :func:`image_only_processor_class`).
    """
    folder = Path(folder)
    processor_config = folder / "processor_config.json"
    name = None
    if processor_config.is_file():
        name = json.loads(processor_config.read_text(encoding="utf-8")).get("processor_class")
    processor_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if isinstance(processor_class, type) and _needs_image_only(processor_class):
        return image_only_processor_class(processor_class).from_pretrained(folder, local_files_only=True)
    return AutoProcessor.from_pretrained(folder, local_files_only=True)


def make_processor(processor_class: type[ProcessorMixin], **kwargs: Any) -> ProcessorMixin:
    if _needs_image_only(processor_class):
        processor_class = image_only_processor_class(processor_class)
    return processor_class(**kwargs)
