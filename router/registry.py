"""Router kinds by name. A new kind is one module plus one line in ``_KINDS`` (imported lazily, so choosing
``tfidf`` never loads torch or an encoder)."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from .base import PersistentRouter
from .errors import RouterStateError
from .trained import META_FILE

_KINDS: dict[str, str] = {
    "hint": "router.hint:HintRouter",
    "tfidf": "router.tfidf:TfidfRouter",
    "embedding": "router.embedding:EmbeddingRouter",
    "base-hidden": "router.base_hidden:BaseHiddenRouter",
    "cascade": "router.cascade:CascadeRouter",
    "gates": "router.gates:GateRouter",
}
DEFAULT_KIND = "cascade"  # measured on the CL benchmark: see bench/router.py and the README


def router_kinds() -> list[str]:
    """The known kinds, sorted."""
    return sorted(_KINDS)


def _factory(kind: str) -> Any:
    if kind not in _KINDS:
        raise ValueError(f"unknown router kind {kind!r}; known kinds: {', '.join(router_kinds())}")
    module, _, name = _KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def make_router(kind: str, **deps: Any) -> PersistentRouter:
    """Build a router of ``kind``. ``deps`` are its constructor arguments (``embed``, ``gate_scores``,
    ``adapter_names``, ``C``, ...); ones the kind does not take are refused with a ValueError naming them,
    and a missing required one is named too."""
    cls = _factory(kind)
    params = inspect.signature(cls.__init__).parameters
    accepted = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = sorted(set(deps) - accepted)
    if unknown:
        raise ValueError(f"router kind {kind!r} takes {sorted(accepted) or 'no arguments'}, not {unknown}")
    missing = sorted(n for n in accepted if params[n].default is inspect.Parameter.empty and n not in deps)
    if missing:
        raise ValueError(f"router kind {kind!r} needs {missing}")
    return cls(**deps)


def saved_kind(directory: str | Path) -> str:
    """The kind recorded in a saved router directory."""
    path = Path(directory) / META_FILE
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["kind"])
    except (OSError, ValueError, KeyError) as e:
        raise RouterStateError(f"cannot read router kind from {path}: {e}") from e


def load_router(directory: str | Path, **deps: Any) -> PersistentRouter:
    """Build the kind saved in ``directory`` with ``deps`` and load its state."""
    router = make_router(saved_kind(directory), **deps)
    router.load(directory)
    return router
