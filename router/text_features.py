"""Sparse text features for the tfidf router: word and char TF-IDF plus a weighted layout block.

Vocabularies and idf are fitted with scikit-learn's TfidfVectorizer; transforming uses fixed-vocabulary counters
and the same weighting (1 + log tf) * idf, L2 rows, both right after fit and after load. Saved as JSON term
lists and npz idf vectors, so no vectorizer object is ever pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

from .errors import RouterStateError
from .layout import layout_tokens


@dataclass(frozen=True)
class TextFeatureConfig:
    """Feature recipe. Defaults were tuned on the dev splits of the CL benchmark (see bench/router.py)."""

    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (1, 4)
    char_min_df: int = 1
    layout_weight: float = 0.35  # scale of the (L2-normalised) layout block against the two tf-idf blocks
    max_chars: int = 2000  # only the start of long prompts is read (bounds routing latency)

    def __post_init__(self) -> None:
        if self.layout_weight < 0:
            raise ValueError(f"layout_weight must be >= 0, got {self.layout_weight}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")


def _fit_vectorizers(cfg: TextFeatureConfig) -> dict[str, TfidfVectorizer]:
    vecs = {
        "word": TfidfVectorizer(sublinear_tf=True, ngram_range=tuple(cfg.word_ngrams)),
        "char": TfidfVectorizer(sublinear_tf=True, analyzer="char", ngram_range=tuple(cfg.char_ngrams),
                                min_df=cfg.char_min_df),
    }
    if cfg.layout_weight > 0:
        vecs["layout"] = TfidfVectorizer(analyzer=layout_tokens, use_idf=False, lowercase=False)
    return vecs


def _counter(name: str, cfg: TextFeatureConfig, vocabulary: dict[str, int]) -> CountVectorizer:
    """A counter over a fixed vocabulary (no fitting needed), tokenizing exactly as the fitted block did."""
    if name == "word":
        return CountVectorizer(ngram_range=tuple(cfg.word_ngrams), vocabulary=vocabulary, dtype=np.float32)
    if name == "char":
        return CountVectorizer(analyzer="char", ngram_range=tuple(cfg.char_ngrams), vocabulary=vocabulary,
                               dtype=np.float32)
    return CountVectorizer(analyzer=layout_tokens, lowercase=False, vocabulary=vocabulary, dtype=np.float32)


@dataclass(frozen=True)
class _Block:
    """One feature block: counts over a fixed vocabulary -> (1 + log tf) * idf -> L2 row -> * scale.

    Rows are computed in plain numpy from the analyzer's tokens (sklearn's own transform costs ~0.3 ms of input
    validation per call, which matters at one request per call).
    """

    analyze: Callable[[str], list[str]]
    vocabulary: dict[str, int]
    idf: np.ndarray | None  # (V,) or None for plain tf
    scale: float
    sublinear: bool

    def row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Column indices (sorted, unique) and values of one text's row."""
        get = self.vocabulary.get
        hits = [i for i in map(get, self.analyze(text)) if i is not None]
        if not hits:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        idx, counts = np.unique(np.asarray(hits, dtype=np.int64), return_counts=True)
        val = counts.astype(np.float64)
        if self.sublinear:
            val = 1.0 + np.log(val)
        if self.idf is not None:
            val *= self.idf[idx]
        val *= self.scale / np.sqrt(np.dot(val, val))
        return idx, val.astype(np.float32)


def _block(name: str, cfg: TextFeatureConfig, terms: list[str], idf: np.ndarray | None) -> _Block:
    vocabulary = {t: i for i, t in enumerate(terms)}
    analyze = _counter(name, cfg, vocabulary).build_analyzer()
    scale = cfg.layout_weight if name == "layout" else 1.0
    return _Block(analyze, vocabulary, idf, scale, sublinear=name != "layout")


class TextFeaturizer:
    """``fit(texts)`` once, then ``transform(texts) -> (N, F)`` sparse rows; immutable after fit."""

    def __init__(self, cfg: TextFeatureConfig, vocab: dict[str, list[str]], idf: dict[str, np.ndarray]) -> None:
        self.cfg = cfg
        self._vocab = vocab
        self._idf = idf
        self._blocks = {name: _block(name, cfg, terms, idf.get(name)) for name, terms in vocab.items()}

    @classmethod
    def fit(cls, texts: list[str], cfg: TextFeatureConfig) -> "TextFeaturizer":
        vocab: dict[str, list[str]] = {}
        idf: dict[str, np.ndarray] = {}
        cut = [t[: cfg.max_chars] for t in texts]
        for name, v in _fit_vectorizers(cfg).items():
            try:
                v.fit(texts if name == "layout" else cut)
            except ValueError:  # no token at all in this block (e.g. one-letter words only): an empty block
                vocab[name] = []
                if v.use_idf:
                    idf[name] = np.zeros(0)
                continue
            vocab[name] = sorted(v.vocabulary_, key=v.vocabulary_.__getitem__)
            if v.use_idf:
                idf[name] = v.idf_.astype(np.float64)
        return cls(cfg, vocab, idf)

    @property
    def n_features(self) -> int:
        return sum(len(t) for t in self._vocab.values())

    def transform(self, texts: list[str]) -> sp.csr_matrix:
        """(N, F) float32 CSR rows: the blocks side by side, in vocabulary order."""
        indices: list[np.ndarray] = []
        values: list[np.ndarray] = []
        indptr = [0]
        for text in texts:
            cut = text[: self.cfg.max_chars]
            offset = 0
            for name, block in self._blocks.items():
                idx, val = block.row(text if name == "layout" else cut)
                indices.append(idx + offset)
                values.append(val)
                offset += len(block.vocabulary)
            indptr.append(indptr[-1] + sum(len(i) for i in indices[-len(self._blocks):]))
        data = np.concatenate(values) if values else np.zeros(0, np.float32)
        cols = np.concatenate(indices) if indices else np.zeros(0, np.int64)
        return sp.csr_matrix((data, cols, np.asarray(indptr)), shape=(len(texts), self.n_features))

    def save(self, directory: Path) -> None:
        (directory / "features.json").write_text(
            json.dumps({"config": asdict(self.cfg), "vocabulary": self._vocab}, ensure_ascii=False), encoding="utf-8")
        np.savez(directory / "idf.npz", **self._idf)

    @classmethod
    def load(cls, directory: Path) -> "TextFeaturizer":
        try:
            state = json.loads((directory / "features.json").read_text(encoding="utf-8"))
            cfg = TextFeatureConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
            vocab = {str(k): [str(t) for t in v] for k, v in state["vocabulary"].items()}
            with np.load(directory / "idf.npz", allow_pickle=False) as z:
                idf = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise RouterStateError(f"cannot read text features in {directory}: {e}") from e
        expected = set(_fit_vectorizers(cfg))
        if set(vocab) != expected:
            raise RouterStateError(f"{directory}: feature blocks {sorted(vocab)} != expected {sorted(expected)}")
        for name in expected - {"layout"}:
            if name not in idf or idf[name].shape != (len(vocab[name]),):
                raise RouterStateError(f"{directory}: idf of block {name!r} does not match its vocabulary")
        return cls(cfg, vocab, idf)
