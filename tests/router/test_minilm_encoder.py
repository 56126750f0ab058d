"""The embedding router's encoder gives sentence-transformers' own vectors for the bundled MiniLM."""

from __future__ import annotations

import numpy as np
import pytest

from router.embedding import minilm_dir, minilm_embedder

TEXTS = ["What is the capital of France?", "Title: Apple Inc.\nText: an American technology company " * 8,
         "sentence 1: the cat sat. sentence 2: a cat was sitting.", "great food, slow service"]


def test_vectors_match_sentence_transformers_encode() -> None:
    st = pytest.importorskip("sentence_transformers")  # installed with the model package; only the reference here
    ref = st.SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
    ref.max_seq_length = 32
    want = ref.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    embed = minilm_embedder(max_tokens=32, batch_size=3)  # two batches, padded, one text truncated
    got = embed(TEXTS)
    assert got.shape == (4, 384) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert float((got * want).sum(1).min()) > 0.9999
    assert embed([]).shape == (0, 384)
    bf16 = minilm_embedder(max_tokens=32, dtype="bfloat16")(TEXTS)  # packed linears where oneDNN has bf16
    assert bf16.dtype == np.float32 and float((bf16 * want).sum(1).min()) > 0.999
