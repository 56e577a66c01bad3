"""Errors raised for bad user input."""

from __future__ import annotations


class InputError(ValueError):
    """A user-supplied file, value or option is unusable; the message says what and how to fix it."""
