"""Domain errors of the adapter store; the server maps them to HTTP codes at its edge."""


class AdapterError(Exception):
    """Base class. ``param`` names the offending field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class AdapterNotFound(AdapterError):
    """No adapter of that name (or version) is registered."""


class AdapterInvalid(AdapterError):
    """The files are unreadable, unsafe, or not an adapter of a known kind."""


class AdapterIncompatible(AdapterError):
    """The adapter does not fit the base model or the server's limits (shapes, rank, modules)."""


class AdapterTooLarge(AdapterError):
    """The upload exceeds the configured size limit."""
