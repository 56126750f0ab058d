"""Shared fixtures: a tiny random Llama (with the real SmolLM2 tokenizer) and the real SmolLM2 directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from base_model.loader import DEFAULT_CACHE_DIR

ROOT = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("CLORA_MODEL_CACHE_DIR", DEFAULT_CACHE_DIR))  # where `clora prepare-model` writes
DATA_DIR = ROOT.parent / "shared" / "data" / "cl_benchmark"

torch.set_num_threads(int(os.environ.get("CLORA_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real embedded model as a safetensors directory (converted once, cached)."""
    from base_model.loader import embedded_model_dir

    return embedded_model_dir(MODEL_CACHE)


def make_tiny_llama(out: Path, tokenizer_src: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer random Llama (hidden 64, GQA 4/2) with SmolLM2's tokenizer; loads in well under a second."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session")
def cl_data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR}")
    return DATA_DIR
