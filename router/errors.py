"""Domain errors of the router package; the server maps them at its edge."""

from __future__ import annotations


class RouterError(Exception):
    """Anything a router cannot do as asked."""


class RouterStateError(RouterError):
    """A saved router directory is missing, unreadable, of another kind, or does not fit this router's inputs."""
