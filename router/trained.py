"""The shared mechanics of a trained router: build a new model off to the side, swap it in atomically.

``fit`` trains a fresh immutable model object under a lock (so concurrent fits queue up) and then replaces the
reference in one assignment; ``route`` reads that reference once per call, so a route on another thread always
sees one complete model, old or new, and never waits for training. Persistence is ``router.json`` (kind,
labels, parameters) plus the subclass's safe files (npz / JSON); nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from .base import BASE_ADAPTER, Decision
from .errors import RouterStateError

META_FILE = "router.json"
FORMAT_VERSION = 1
M = TypeVar("M")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def read_meta(directory: Path, kind: str) -> dict[str, Any]:
    """The saved ``router.json`` of ``directory``, checked to belong to router kind ``kind``."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RouterStateError(f"cannot read {path}: {e}") from e
    if meta.get("kind") != kind:
        raise RouterStateError(f"{path} holds a {meta.get('kind')!r} router, not {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise RouterStateError(f"{path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    return meta


def check_examples(examples: dict[str, list[str]]) -> dict[str, list[str]]:
    """Drop adapters without examples and the reserved base name; refuse non-string prompts."""
    out: dict[str, list[str]] = {}
    for name, prompts in examples.items():
        if name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for the base model and cannot be a routing target")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"adapter {name!r}: examples must be strings, got {type(bad[0]).__name__}")
        if prompts:
            out[name] = list(prompts)
    return out


def decisions(labels: tuple[str, ...], p: np.ndarray, method: str) -> list[Decision]:
    """The most probable label of each row of ``p`` (N, K), its probability as the confidence."""
    best = p.argmax(axis=1)
    return [Decision(labels[k], method, float(np.clip(p[i, k], 0.0, 1.0))) for i, k in enumerate(best)]


class TrainedRouter(ABC, Generic[M]):
    """Base of the classifier routers. Subclasses supply ``kind``, ``_build``, ``_probs``, ``_save``, ``_load``.

    Before any fit (or with no adapter that has examples) every text goes to ``BASE_ADAPTER`` with
    method ``"default"`` and confidence 0.0. With one target adapter it is chosen with confidence 1.0.
    """

    kind: str = ""

    def __init__(self) -> None:
        self._model: M | None = None
        self._fit_lock = threading.Lock()

    # -- what subclasses implement -------------------------------------------------------------
    @abstractmethod
    def _build(self, texts: list[str], labels: list[str]) -> M:
        """Train a new model on (text, adapter) pairs; must not touch ``self._model``."""

    @abstractmethod
    def _probs(self, model: M, texts: list[str]) -> np.ndarray:
        """(N, K) class probabilities, columns in the order of ``self._model_labels(model)``."""

    @abstractmethod
    def _model_labels(self, model: M) -> tuple[str, ...]:
        """The labels of ``model``'s columns."""

    @abstractmethod
    def _save(self, model: M, directory: Path) -> dict[str, Any]:
        """Write the model's files into ``directory``; return extra entries for ``router.json``."""

    @abstractmethod
    def _load(self, directory: Path, meta: dict[str, Any]) -> M:
        """Read a model written by ``_save``."""

    # -- the Router protocol -------------------------------------------------------------------
    def fit(self, examples: dict[str, list[str]]) -> None:
        """(Re)train on ``{adapter: [prompt, ...]}`` and swap the new model in; serving continues meanwhile."""
        clean = check_examples(examples)
        with self._fit_lock:
            if not clean:
                self._model = None
                return
            texts = [t for name in sorted(clean) for t in clean[name]]
            labels = [name for name in sorted(clean) for _ in clean[name]]
            self._model = self._build(texts, labels)  # one reference assignment: atomic for readers

    def route(self, texts: list[str]) -> list[Decision]:
        """One ``Decision`` per text; confidence is the calibrated probability of the chosen adapter."""
        model = self._model  # read once: this call uses one consistent model
        if model is None:
            return [Decision(BASE_ADAPTER, "default", 0.0) for _ in texts]
        if not texts:
            return []
        labels, p = self._distribution(model, list(texts))
        return decisions(labels, p, self.kind)

    def distribution(self, texts: list[str]) -> tuple[tuple[str, ...], np.ndarray] | None:
        """The labels and (N, K) calibrated probabilities of ``texts``; None before any fit."""
        model = self._model
        return None if model is None else self._distribution(model, list(texts))

    def _distribution(self, model: M, texts: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
        labels = self._model_labels(model)
        p = self._probs(model, texts)  # (N, K)
        assert p.shape == (len(texts), len(labels)), (p.shape, len(texts), len(labels))
        return labels, p

    def labels(self) -> list[str]:
        model = self._model
        return [] if model is None else list(self._model_labels(model))

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``router.json`` and the model's npz/JSON files into ``directory`` (created if missing)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        model = self._model
        meta: dict[str, Any] = {"kind": self.kind, "format_version": FORMAT_VERSION, "fitted": model is not None}
        if model is not None:
            meta["labels"] = list(self._model_labels(model))
            meta.update(self._save(model, d))
        write_json_atomic(d / META_FILE, meta)  # written last: its presence means the files are complete

    def load(self, directory: str | Path) -> None:
        """Replace the current model with the one saved in ``directory`` (atomically, like ``fit``)."""
        d = Path(directory)
        meta = read_meta(d, self.kind)
        with self._fit_lock:
            self._model = self._load(d, meta) if meta.get("fitted") else None
