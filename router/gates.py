"""The ``gates`` router: GainLoRA-style gate values per request, argmax over the allowed adapters.

``gate_scores(texts) -> (N, n)`` gives one non-negative gate value per adapter in ``adapter_names()`` order
(a list, or a callable so the names can follow the server's registry). ``fit(examples)`` does not train
anything: it sets which adapters may be chosen (those with examples), so a removed adapter is never chosen.
Confidence is the chosen gate's share of the allowed gates' sum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .base import BASE_ADAPTER, Decision
from .trained import FORMAT_VERSION, META_FILE, check_examples, read_meta, write_json_atomic

GateScores = Callable[[list[str]], np.ndarray]


class GateRouter:
    """Argmax of normalised gate values over the adapters that are both gated and allowed."""

    kind = "gates"

    def __init__(self, gate_scores: GateScores, adapter_names: Sequence[str] | Callable[[], Sequence[str]]) -> None:
        if not callable(gate_scores):
            raise ValueError("gates router needs a callable gate_scores(texts) -> (N, n_adapters) array")
        self.gate_scores = gate_scores
        self._names = adapter_names if callable(adapter_names) else (lambda n=tuple(adapter_names): n)
        self._allowed: frozenset[str] | None = None  # None: every gated adapter

    def fit(self, examples: dict[str, list[str]]) -> None:
        self._allowed = frozenset(check_examples(examples))

    def labels(self) -> list[str]:
        allowed = self._allowed
        return [n for n in self._names() if allowed is None or n in allowed]

    def route(self, texts: list[str]) -> list[Decision]:
        names = list(self._names())
        allowed = self._allowed
        if not texts:
            return []
        s = np.asarray(self.gate_scores(list(texts)), dtype=np.float64)
        if s.shape != (len(texts), len(names)):
            raise ValueError(f"gate_scores gave shape {s.shape}; expected ({len(texts)}, {len(names)})")
        if (s < 0).any() or not np.isfinite(s).all():
            raise ValueError("gate_scores must be finite and non-negative")
        keep = np.array([allowed is None or n in allowed for n in names], dtype=bool)
        s = s * keep  # (N, n): gates of adapters that may not be chosen count as zero
        total = s.sum(axis=1)
        out = []
        for i in range(len(texts)):
            if total[i] <= 0:
                out.append(Decision(BASE_ADAPTER, "default", 0.0))
                continue
            k = int(s[i].argmax())
            out.append(Decision(names[k], self.kind, float(s[i, k] / total[i])))
        return out

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        allowed = None if self._allowed is None else sorted(self._allowed)
        write_json_atomic(d / META_FILE, {"kind": self.kind, "format_version": FORMAT_VERSION, "allowed": allowed})

    def load(self, directory: str | Path) -> None:
        meta: dict[str, Any] = read_meta(Path(directory), self.kind)
        allowed = meta.get("allowed")
        self._allowed = None if allowed is None else frozenset(allowed)
