"""The bad image files of the guard tests, for the CLI and demo tests too."""

from tests.defend.conftest import corrupt_png, huge_png

__all__ = ["corrupt_png", "huge_png"]
