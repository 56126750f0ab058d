"""The ``tfidf`` router: word + char TF-IDF and layout tokens, a calibrated logistic-regression head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .linear_head import SoftmaxHead, fit_softmax_head
from .text_features import TextFeatureConfig, TextFeaturizer
from .trained import TrainedRouter


@dataclass(frozen=True)
class TfidfModel:
    features: TextFeaturizer
    head: SoftmaxHead


class TfidfRouter(TrainedRouter[TfidfModel]):
    """Sparse lexical + layout classifier. ``C`` is the inverse L2 strength; ``calibrate_folds`` (>= 2) fits
    the softmax temperature out of fold, so confidences are calibrated probabilities (1 disables)."""

    kind = "tfidf"

    def __init__(self, C: float = 30.0, calibrate_folds: int = 3, features: TextFeatureConfig | None = None) -> None:
        super().__init__()
        if C <= 0:
            raise ValueError(f"C must be > 0, got {C}")
        self.C = C
        self.calibrate_folds = calibrate_folds
        self.features = features or TextFeatureConfig()

    def _build(self, texts: list[str], labels: list[str]) -> TfidfModel:
        feats = TextFeaturizer.fit(texts, self.features)
        head = fit_softmax_head(feats.transform(texts), labels, self.C, self.calibrate_folds)
        return TfidfModel(feats, head)

    def _probs(self, model: TfidfModel, texts: list[str]) -> np.ndarray:
        return model.head.probs(model.features.transform(texts))

    def _model_labels(self, model: TfidfModel) -> tuple[str, ...]:
        return model.head.labels

    def _save(self, model: TfidfModel, directory: Path) -> dict[str, Any]:
        model.features.save(directory)
        model.head.save(directory / "head.npz")
        return {"C": self.C}

    def _load(self, directory: Path, meta: dict[str, Any]) -> TfidfModel:
        labels = tuple(meta["labels"])
        return TfidfModel(TextFeaturizer.load(directory), SoftmaxHead.load(directory / "head.npz", labels))
