"""Small shared helpers for the continual tests (a tiny model, tiny task data, a reference LoRA forward)."""

from __future__ import annotations

from pathlib import Path

import torch

from base_model.loader import load_base_model
from continual.config import TrainConfig
from continual.data import load_task
from continual.methods import get_method

ROOT = Path(__file__).resolve().parents[2]


def tiny(tiny_llama_dir: Path):
    return load_base_model(str(tiny_llama_dir), ROOT / ".model_cache", "cpu", "float32")


def tiny_method(tiny_llama_dir: Path, cl_data_dir: Path, method: str, n_train: int = 4, **cfg):
    loaded = tiny(tiny_llama_dir)
    c = TrainConfig(method=method, max_train=n_train, max_test=3, max_input_chars=120, **cfg)
    data = [load_task(cl_data_dir, t, c.max_train, c.max_test, c.seed, c.max_input_chars) for t in ("agnews", "amazon")]
    return loaded, get_method(method)(loaded.model, c, data, loaded.name)


def randomize(method, t: int, gen_seed: int = 1) -> None:
    """Give the trainable tensors of task t non-zero values (so exports are not trivially zero)."""
    g = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for layer in method.layers.values():
            for p in list(layer.As) + list(layer.Bs):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if layer.R_delta is not None and layer.R_delta.requires_grad:
                layer.R_delta.copy_(torch.randn(layer.R_delta.shape, generator=g) * 0.1)


def logits(model, tokenizer, prompt: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()  # (T, V)
