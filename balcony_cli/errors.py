"""Typed errors that the command line turns into one message and an exit code."""

from __future__ import annotations


class BalconyError(Exception):
    """A failure the user should see as one line, without a traceback (exit code 1)."""

    exit_code = 1


class BadInputError(BalconyError):
    """Invalid input: a bad flag value, a missing file, an existing output (exit code 2).

    The message names the input and the fix.
    """

    exit_code = 2
