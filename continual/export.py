"""Writers of the served adapter formats (docs/adapter_formats.md); every write is atomic (tmp dir + rename)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def _atomic_dir(path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def write_peft(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
               target_modules: list[str], base_name: str) -> Path:
    """PEFT LoRA dir: ``adapter_config.json`` + ``adapter_model.safetensors`` with ΔW = scale · B A per module.

    ``modules``: path -> (A (R, in), B (out, R)); all modules share R, and ``lora_alpha = scale * R`` so that
    PEFT's ``lora_alpha / r`` equals ``scale``.
    """
    ranks = {int(A.shape[0]) for A, _ in modules.values()}
    assert len(ranks) == 1, f"all modules must share one rank, got {ranks}"
    R = ranks.pop()
    tensors = {}
    for mod, (A, B) in modules.items():
        assert A.shape[0] == B.shape[1] == R
        tensors[f"base_model.model.{mod}.lora_A.weight"] = A.float().contiguous().cpu()
        tensors[f"base_model.model.{mod}.lora_B.weight"] = B.float().contiguous().cpu()
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": float(scale * R),
        "target_modules": sorted(target_modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": base_name,
    }
    tmp = _atomic_dir(path)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    _commit(tmp, Path(path))
    return Path(path)


def write_kind(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A non-PEFT kind: ``clora_adapter.json`` (``meta``, must hold ``kind``) + ``adapter.safetensors``."""
    assert "kind" in meta
    tmp = _atomic_dir(path)
    save_file({k: v.float().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "adapter.safetensors"))
    (tmp / "clora_adapter.json").write_text(json.dumps(meta, indent=1))
    _commit(tmp, Path(path))
    return Path(path)
