"""Kind ``peft_lora``: a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from safetensors.torch import load_file

from ..errors import AdapterInvalid
from ..kinds import register_kind
from ..weights import AdapterWeights, LoraPair

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
CONVERT_HINT = (
    "adapters must be safetensors (pickle is never loaded): convert with "
    "`PeftModel.from_pretrained(base, dir).save_pretrained(out, safe_serialization=True)`"
)


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterInvalid(f"adapter_config.json is unreadable: {e}", param="file") from e


def _unsupported(cfg: dict) -> list[str]:
    problems = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} is not supported (use bias='none')")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} is not supported")
    if cfg.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=True is not supported")
    return problems


@register_kind("peft_lora")
def load_peft_lora(path: Path, device: str = "cpu") -> AdapterWeights:
    path = Path(path)
    cfg = read_config(path)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterInvalid(f"found {pickles} but no adapter_model.safetensors; {CONVERT_HINT}", param="file")
        raise AdapterInvalid("adapter_model.safetensors is missing", param="file")
    problems = _unsupported(cfg)
    if problems:
        raise AdapterInvalid("; ".join(problems), param="file")
    try:
        tensors = load_file(str(weights_file), device=device)
    except Exception as e:  # safetensors raises several types for corrupt files
        raise AdapterInvalid(f"adapter_model.safetensors is unreadable: {e}", param="file") from e

    halves: dict[str, dict[str, object]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterInvalid(f"unexpected tensor {key!r} in adapter_model.safetensors", param="file")
        halves.setdefault(m["module"], {})[m["ab"]] = t

    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    modules: dict[str, LoraPair] = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterInvalid(f"{module}: needs both lora_A and lora_B", param="file")
        A, B = ab["A"], ab["B"]
        r = _pattern_value(rank_pattern, module, r_default)
        alpha = _pattern_value(alpha_pattern, module, alpha_default)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterInvalid(
                f"{module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form a rank-r pair",
                param="file",
            )
        modules[module] = LoraPair(A.contiguous(), B.contiguous(), float(scale))
    if not modules:
        raise AdapterInvalid("adapter_model.safetensors holds no LoRA tensors", param="file")
    rank = max(p.A.shape[0] for p in modules.values())
    return AdapterWeights(kind="peft_lora", rank=rank, modules=modules,
                          meta={"r": r_default, "lora_alpha": alpha_default,
                                "target_modules": cfg.get("target_modules")})


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.search(key, module):
            return value
    return default
