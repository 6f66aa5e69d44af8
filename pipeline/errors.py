"""The root of every error LSI-Guard expects: bad input, bad configuration, a missing model or file.

Each module defines its own errors next to the code that raises them, all subclassing
:class:`LSIGuardError` (and, where callers rely on it, ``ValueError`` or ``RuntimeError`` too).
Stages, the CLI and the web demo catch this one type and print its message; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class LSIGuardError(Exception):
    """An expected failure whose message names what is wrong (the file, row, key or shard) and how to fix it."""
