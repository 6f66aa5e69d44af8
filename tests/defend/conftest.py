"""Bad image files for the guard, CLI and demo tests: a huge-but-small PNG and one with a corrupt pixel stream."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.conftest import corrupt_idat_bytes, huge_png_bytes


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20,000 x 20,000 PNG (400 megapixels) of one colour, a small file; made once a session."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    path.write_bytes(huge_png_bytes())
    return path


@pytest.fixture(scope="session")
def corrupt_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PNG whose header and checksums are fine but whose pixel stream cannot be decoded."""
    path = tmp_path_factory.mktemp("corrupt") / "corrupt.png"
    path.write_bytes(corrupt_idat_bytes())
    return path
