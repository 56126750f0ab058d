"""Make PEFT adapters with non-trivial weights for tests (lora_B is zero at init, so randomise it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_peft_adapter(base_dir: Path, out: Path, r: int, seed: int,
                      targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                      alpha: int | None = None, std: float = 0.05) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets), lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(out, safe_serialization=True)
    return out


def peft_alone(base_dir: Path, adapter: Path | None) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, model): the base in float32 with ``adapter`` alone on it (None: the base), the reference the
    server's rows are checked against."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return AutoTokenizer.from_pretrained(base_dir), model


def fixed_rows(ranks: dict[int, int], width: int) -> dict[int, list[int]]:
    """Pool rows for slots of the given ranks, slot s from row ``s · width`` on (what the slot table would give
    slots of rank up to ``width`` placed in order)."""
    return {s: list(range(s * width, s * width + r)) for s, r in ranks.items()}
