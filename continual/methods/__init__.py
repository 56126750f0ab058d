"""Registry of continual-learning methods: a method is one module that registers a ``Method`` subclass."""

from __future__ import annotations

from typing import Callable

from ..errors import ContinualError
from .base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def known_methods() -> list[str]:
    _import_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    _import_builtin()
    if name not in _METHODS:
        raise ContinualError(f"unknown method {name!r}; known: {sorted(_METHODS)}")
    return _METHODS[name]


def _import_builtin() -> None:
    from . import clora, gainlora, multitask, olora, per_task, seq  # noqa: F401
