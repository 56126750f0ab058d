"""The ``cascade`` router: TF-IDF decides alone when it is sure; the base model's hidden states settle the rest.

Lexical features are cheap (well under a millisecond) and right on the vast majority of prompts, but they
plateau where two tasks share a form and a vocabulary (news vs. reviews written as ``Title: ... Text: ...``).
The dense router sees meaning rather than words and errs on different prompts. So:

    p1 = tfidf(text)                                      # calibrated (K,)
    if max p1 >= escalate_below: answer argmax p1          # most prompts stop here
    else: p = normalise(p1 * p2), p2 = dense(text)         # product of the two calibrated experts

Both stages are trained on the same examples (same labels, same order). State is saved in two
sub-directories, ``tfidf/`` and ``dense/``, next to this kind's ``router.json``; nothing is pickled.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .base import BASE_ADAPTER, Decision
from .base_hidden import BaseHiddenRouter
from .dense import Embed
from .errors import RouterStateError
from .tfidf import TfidfRouter
from .trained import FORMAT_VERSION, META_FILE, decisions, read_meta, write_json_atomic

DEFAULT_ESCALATE_BELOW = 0.99


class CascadeRouter:
    """TF-IDF first; below ``escalate_below`` confidence, the product with a base-hidden (dense) router."""

    kind = "cascade"

    def __init__(self, embed: Embed, escalate_below: float = DEFAULT_ESCALATE_BELOW) -> None:
        if not 0.0 <= escalate_below <= 1.0:
            raise ValueError(f"escalate_below must be in [0, 1], got {escalate_below}")
        self.escalate_below = escalate_below
        self.first = TfidfRouter()
        self.second = BaseHiddenRouter(embed)
        self._fit_lock = threading.Lock()

    def fit(self, examples: dict[str, list[str]]) -> None:
        with self._fit_lock:  # dense stage first: once tfidf knows the new adapters, so does the dense stage
            self.second.fit(examples)  # (in between, labels differ and route() keeps tfidf's answer)
            self.first.fit(examples)

    def labels(self) -> list[str]:
        return self.first.labels()

    def route(self, texts: list[str]) -> list[Decision]:
        texts = list(texts)
        first = self.first.distribution(texts)
        if first is None:
            return [Decision(BASE_ADAPTER, "default", 0.0) for _ in texts]
        labels, p = first  # (N, K)
        unsure = np.flatnonzero(p.max(axis=1) < self.escalate_below)
        out = decisions(labels, p, self.first.kind)
        if unsure.size == 0:
            return out
        second = self.second.distribution([texts[i] for i in unsure])
        if second is None or second[0] != labels:  # a refit is between its two stages: keep the first answer
            return out
        joint = p[unsure] * second[1]  # (n_unsure, K)
        joint /= np.maximum(joint.sum(axis=1, keepdims=True), 1e-300)
        for i, d in zip(unsure, decisions(labels, joint, self.kind)):
            out[i] = d
        return out

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.first.save(d / "tfidf")
        self.second.save(d / "dense")
        write_json_atomic(d / META_FILE, {"kind": self.kind, "format_version": FORMAT_VERSION,
                                          "escalate_below": self.escalate_below})

    def load(self, directory: str | Path) -> None:
        d = Path(directory)
        read_meta(d, self.kind)
        with self._fit_lock:
            self.first.load(d / "tfidf")
            self.second.load(d / "dense")
        if self.first.labels() != self.second.labels():
            raise RouterStateError(f"{d}: the tfidf and dense stages were trained on different adapters")
