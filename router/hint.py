"""The ``hint`` kind: no classifier. Requests name their adapter; anything else goes to the base model."""

from __future__ import annotations

from pathlib import Path

from .base import BASE_ADAPTER, Decision
from .trained import FORMAT_VERSION, META_FILE, read_meta, write_json_atomic


class HintRouter:
    """Routes every text to ``BASE_ADAPTER`` with confidence 0.0 and method ``"default"``; has no labels."""

    kind = "hint"

    def fit(self, examples: dict[str, list[str]]) -> None:
        return None

    def route(self, texts: list[str]) -> list[Decision]:
        return [Decision(BASE_ADAPTER, "default", 0.0) for _ in texts]

    def labels(self) -> list[str]:
        return []

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(d / META_FILE, {"kind": self.kind, "format_version": FORMAT_VERSION})

    def load(self, directory: str | Path) -> None:
        read_meta(Path(directory), self.kind)
