"""Domain errors of the adapter store; the server maps them to HTTP codes at its edge.

Every error carries ``message`` (one human sentence or a numbered list of problems), ``param`` (the offending
field when there is one) and ``problems`` (each ``(field, message)`` pair when validation found several), so the
edge can answer with one message that names every field and its fix.
"""

from __future__ import annotations

from collections.abc import Sequence


class AdapterError(Exception):
    """Base class. ``param`` names the offending field when there is one."""

    def __init__(self, message: str, param: str | None = None,
                 problems: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.problems: tuple[tuple[str, str], ...] = tuple(problems) or ((param or "adapter", message),)


class AdapterNotFound(AdapterError):
    """No adapter of that name (or version) is registered."""


class AdapterInvalid(AdapterError):
    """The files are unreadable, unsafe, or not an adapter of a known kind (also: a bad name or metadata)."""


class AdapterIncompatible(AdapterError):
    """The adapter does not fit the base model or the server's limits (shapes, rank, modules)."""


class AdapterTooLarge(AdapterError):
    """The upload exceeds the configured size limit."""
