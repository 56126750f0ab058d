"""What a router is: texts in, one Decision per text out. Imports nothing of the rest of clora-serve."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

BASE_ADAPTER = "__base__"  # reserved name: the plain base model, no adapter


@dataclass(frozen=True)
class Decision:
    """Where one request goes, and why. ``adapter`` is a registered name or ``BASE_ADAPTER``."""

    adapter: str
    method: str  # hint | tfidf | embedding | base-hidden | gates | fallback | default
    confidence: float
    version: int | None = None


@runtime_checkable
class Router(Protocol):
    """A classifier over registered adapters, trained from each adapter's example prompts."""

    kind: str

    def fit(self, examples: dict[str, list[str]]) -> None:
        """(Re)train on ``{adapter_name: [prompt, ...]}``; an adapter with no examples is not a target."""

    def route(self, texts: list[str]) -> list[Decision]:
        """One decision per text; confidence in [0, 1]."""

    def labels(self) -> list[str]:
        """Adapters this router can currently choose."""


RouterFactory = Callable[..., Router]


@runtime_checkable
class PersistentRouter(Router, Protocol):
    """A router whose trained state can be written to and read from a directory (JSON / npz, never pickle)."""

    def save(self, directory: str | Path) -> None:
        """Write the current state into ``directory``."""

    def load(self, directory: str | Path) -> None:
        """Replace the current state with the one saved in ``directory`` (atomically for route())."""
