"""Routers over dense sentence vectors from an injected encoder: ``embed(texts) -> (N, H)`` float array.

The encoder is a dependency, not state: it is given to the constructor (the server hands over one built on its
resident model), is never saved, and a loaded head is checked against its width on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import RouterStateError
from .layout import layout_tokens
from .linear_head import SoftmaxHead, fit_softmax_head
from .trained import TrainedRouter

Embed = Callable[[list[str]], np.ndarray]
Run = Callable[[Callable[[], np.ndarray]], np.ndarray]  # executes an encoder forward (e.g. on the engine thread)


def run_here(fn: Callable[[], np.ndarray]) -> np.ndarray:
    return fn()


def l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero); (N, H) -> (N, H) float32."""
    x = np.asarray(x, dtype=np.float32)
    assert x.ndim == 2, x.shape
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


@dataclass(frozen=True)
class DenseModel:
    """Standardise the encoder vector (train mean/std), L2 it, append the weighted layout block, apply head."""

    mean: np.ndarray  # (H,)
    std: np.ndarray  # (H,)
    layout_vocab: tuple[str, ...]
    head: SoftmaxHead

    def features(self, vectors: np.ndarray, texts: list[str], layout_weight: float) -> np.ndarray:
        x = l2_rows((vectors - self.mean) / self.std)  # (N, H)
        if not self.layout_vocab:
            return x
        return np.hstack([x, layout_weight * layout_matrix(texts, self.layout_vocab)])  # (N, H + V)


def layout_matrix(texts: list[str], vocab: tuple[str, ...]) -> np.ndarray:
    """(N, V) L2-normalised counts of ``layout_tokens`` over a fixed vocabulary."""
    index = {t: i for i, t in enumerate(vocab)}
    out = np.zeros((len(texts), len(vocab)), np.float32)
    for r, text in enumerate(texts):
        for tok in layout_tokens(text):
            if tok in index:
                out[r, index[tok]] += 1.0
    return l2_rows(out)


class DenseRouter(TrainedRouter[DenseModel]):
    """Calibrated logistic regression on standardised, L2-normalised encoder vectors plus the layout block
    (``layout_weight`` 0 leaves it out; see router/layout.py). Subclasses set ``kind``."""

    kind = "dense"

    def __init__(self, embed: Embed, C: float = 10.0, calibrate_folds: int = 3, layout_weight: float = 0.7) -> None:
        super().__init__()
        if not callable(embed):
            raise ValueError(f"{self.kind} router needs a callable embed(texts) -> (N, H) array")
        if C <= 0:
            raise ValueError(f"C must be > 0, got {C}")
        self.embed = embed
        self.C = C
        self.calibrate_folds = calibrate_folds
        if layout_weight < 0:
            raise ValueError(f"layout_weight must be >= 0, got {layout_weight}")
        self.layout_weight = layout_weight

    def _vectors(self, texts: list[str]) -> np.ndarray:
        x = np.asarray(self.embed(texts))
        if x.ndim != 2 or x.shape[0] != len(texts):
            raise ValueError(f"embed returned shape {x.shape} for {len(texts)} texts; expected (N, H)")
        return l2_rows(x)

    def _build(self, texts: list[str], labels: list[str]) -> DenseModel:
        v = self._vectors(texts)  # (N, H)
        vocab = tuple(sorted({t for text in texts for t in layout_tokens(text)})) if self.layout_weight > 0 else ()
        model = DenseModel(v.mean(0), v.std(0) + 1e-6, vocab, None)  # type: ignore[arg-type]
        head = fit_softmax_head(model.features(v, texts, self.layout_weight), labels, self.C, self.calibrate_folds)
        return DenseModel(model.mean, model.std, vocab, head)

    def _probs(self, model: DenseModel, texts: list[str]) -> np.ndarray:
        v = self._vectors(texts)
        if v.shape[1] != model.mean.shape[0]:
            raise RouterStateError(
                f"{self.kind} router was trained on {model.mean.shape[0]}-d vectors, encoder gives {v.shape[1]}")
        return model.head.probs(model.features(v, texts, self.layout_weight))

    def _model_labels(self, model: DenseModel) -> tuple[str, ...]:
        return model.head.labels

    def _save(self, model: DenseModel, directory: Path) -> dict[str, Any]:
        model.head.save(directory / "head.npz")
        np.savez(directory / "standardize.npz", mean=model.mean, std=model.std)
        return {"C": self.C, "dim": int(model.mean.shape[0]), "layout_weight": self.layout_weight,
                "layout_vocab": list(model.layout_vocab)}

    def _load(self, directory: Path, meta: dict[str, Any]) -> DenseModel:
        try:
            with np.load(directory / "standardize.npz", allow_pickle=False) as z:
                mean, std = z["mean"], z["std"]
            vocab = tuple(str(t) for t in meta["layout_vocab"])
            weight = float(meta["layout_weight"])
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise RouterStateError(f"cannot read {self.kind} router state in {directory}: {e}") from e
        if weight != self.layout_weight:
            raise RouterStateError(f"{directory} was trained with layout_weight {weight}, router has {self.layout_weight}")
        head = SoftmaxHead.load(directory / "head.npz", tuple(meta["labels"]))
        if head.weight.shape[1] != mean.shape[0] + len(vocab):
            raise RouterStateError(f"{directory}: head width {head.weight.shape[1]} != {mean.shape[0]} + {len(vocab)}")
        return DenseModel(mean, std, vocab, head)
