"""Registry of adapter kinds: a kind is a function that reads a directory into ``AdapterWeights``.

A new kind is a new module under ``loaders/`` that calls ``register_kind`` plus one import line below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .errors import AdapterInvalid
from .weights import AdapterWeights

KindLoader = Callable[[Path, str], AdapterWeights]  # (directory, device) -> weights
_KINDS: dict[str, KindLoader] = {}

KIND_FILE = "clora_adapter.json"  # present for non-PEFT kinds: {"kind": ..., ...}


def register_kind(name: str) -> Callable[[KindLoader], KindLoader]:
    def deco(fn: KindLoader) -> KindLoader:
        _KINDS[name] = fn
        return fn

    return deco


def known_kinds() -> list[str]:
    _import_builtin()
    return sorted(_KINDS)


def detect_kind(path: Path) -> str:
    """``clora_adapter.json`` names the kind; a PEFT ``adapter_config.json`` alone means ``peft_lora``."""
    path = Path(path)
    if (path / KIND_FILE).is_file():
        try:
            return str(json.loads((path / KIND_FILE).read_text())["kind"])
        except (ValueError, KeyError) as e:
            raise AdapterInvalid(f"{KIND_FILE} must be JSON with a 'kind' field ({e})", param="file") from e
    if (path / "adapter_config.json").is_file():
        return "peft_lora"
    raise AdapterInvalid(
        f"{path.name}: no adapter_config.json (PEFT) or {KIND_FILE} found; upload a PEFT adapter directory "
        "saved with save_pretrained(safe_serialization=True)",
        param="file",
    )


def load_adapter_dir(path: Path, device: str = "cpu") -> AdapterWeights:
    _import_builtin()
    kind = detect_kind(path)
    if kind not in _KINDS:
        raise AdapterInvalid(f"unknown adapter kind {kind!r}; known kinds: {known_kinds()}", param="kind")
    return _KINDS[kind](Path(path), device)


def _import_builtin() -> None:
    from .loaders import peft_lora  # noqa: F401

    try:  # kinds written by the continual trainer
        from .loaders import clora, gainlora  # noqa: F401
    except ImportError:
        pass
