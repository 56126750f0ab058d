"""Domain errors of the continual trainer; the CLI prints them as one line and exits non-zero."""


class ContinualError(Exception):
    """A bad option, missing data or an incompatible checkpoint; the message says how to fix it."""
