"""Fixtures shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small red picture with no text in it."""
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (50, 40), (220, 30, 30)).save(path)
    return path
