"""The project's error type for mistakes in what the user gave us (files, options, folders).

The CLI prints a UserError's message alone and exits 2; anything else is a bug and keeps its traceback.
It subclasses ValueError so that Python callers who catch ValueError for bad arguments keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input or command line, explained in one readable message."""
