"""Errors the ``ce-eval`` command line reports as one line on stderr, without a traceback."""

from __future__ import annotations


class CommandError(Exception):
    """A failure to report on stderr with exit status 1 (no traceback)."""
