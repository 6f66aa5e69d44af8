"""Device and dtype choices shared by every adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.models.base import RequestGroup, resolve_dtype, resolve_dtype_name


def test_auto_dtype_is_half_on_gpu_and_full_on_cpu() -> None:
    assert resolve_dtype_name("auto", torch.device("cuda")) == "float16"
    assert resolve_dtype_name("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype_name("bfloat16", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype_name("float16", torch.device("cpu")) == "float16"


def test_unknown_dtype_names_the_choices() -> None:
    with pytest.raises(ValueError, match="float64.*bfloat16"):
        resolve_dtype("float64")


def test_request_group_keeps_text_order_and_shares_the_image(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    group = RequestGroup(texts=("a", "b", "c"), image=image)
    assert [r.text for r in group.requests()] == ["a", "b", "c"]
    assert {r.image for r in group.requests()} == {image}
