"""A temperature-calibrated multinomial logistic-regression head, stored as plain arrays (npz, no pickle).

Training uses scikit-learn; prediction is a matrix product in numpy, so a saved head needs nothing but its
arrays. ``calibrate_folds`` > 1 fits the temperature on out-of-fold scores, so the probability of the chosen
class is a calibrated confidence rather than the raw (usually under- or over-confident) regression output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from .calibration import fit_temperature, softmax
from .errors import RouterStateError

Features = np.ndarray | sp.spmatrix


@dataclass(frozen=True)
class SoftmaxHead:
    """``probs(X) = softmax((X @ W.T + b) / temperature)``; W is (K, F), b is (K,), one row per label."""

    labels: tuple[str, ...]
    weight: np.ndarray  # (K, F) float32
    bias: np.ndarray  # (K,) float32
    temperature: float

    def logits(self, x: Features) -> np.ndarray:
        assert x.shape[1] == self.weight.shape[1], (x.shape, self.weight.shape)
        out = x @ self.weight.T  # (N, K)
        return np.asarray(out, dtype=np.float64) + self.bias

    def probs(self, x: Features) -> np.ndarray:
        return softmax(self.logits(x), self.temperature)

    def save(self, path: Path) -> None:
        np.savez(path, weight=self.weight, bias=self.bias, temperature=np.float64(self.temperature))

    @classmethod
    def load(cls, path: Path, labels: tuple[str, ...]) -> "SoftmaxHead":
        try:
            with np.load(path, allow_pickle=False) as z:
                w, b, t = z["weight"], z["bias"], float(z["temperature"])
        except (OSError, KeyError, ValueError) as e:
            raise RouterStateError(f"cannot read classifier head {path}: {e}") from e
        if w.shape[0] != len(labels) or b.shape != (len(labels),):
            raise RouterStateError(f"{path}: head has {w.shape[0]} rows for {len(labels)} labels")
        return cls(labels, w, b, t)


def _fit_lr(x: Features, y: np.ndarray, n_labels: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """LogisticRegression as (K, F) weights and (K,) biases, also for two labels (sklearn keeps one row)."""
    lr = LogisticRegression(C=c, max_iter=3000)
    lr.fit(x, y)
    w, b = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
    if n_labels == 2:  # sigmoid(s) == softmax([0, s])
        w = np.vstack([np.zeros_like(w), w])
        b = np.concatenate([np.zeros_like(b), b])
    return w, b


def fit_softmax_head(x: Features, y: list[str], c: float, calibrate_folds: int = 3, seed: int = 0) -> SoftmaxHead:
    """Fit on features (N, F) and string labels; one label gives a head that always answers it with p = 1."""
    labels = tuple(sorted(set(y)))
    if len(labels) == 1:
        return SoftmaxHead(labels, np.zeros((1, x.shape[1]), np.float32), np.zeros(1, np.float32), 1.0)
    index = {lab: i for i, lab in enumerate(labels)}
    yi = np.array([index[v] for v in y])
    w, b = _fit_lr(x, yi, len(labels), c)
    temperature = 1.0
    folds = min(calibrate_folds, int(np.bincount(yi).min()))
    if folds >= 2:
        oof = np.zeros((len(yi), len(labels)))
        for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(yi)), yi):
            fw, fb = _fit_lr(x[tr], yi[tr], len(labels), c)
            oof[te] = np.asarray(x[te] @ fw.T) + fb
        temperature = fit_temperature(oof, yi)
    return SoftmaxHead(labels, w, b, temperature)
