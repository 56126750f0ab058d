"""Store fixtures: the tiny Llama's spec, and tiny PEFT adapters written with peft or directly with safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters_store.spec import BaseModelSpec
from adapters_store.store import AdapterStore

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def base_spec(tiny_model: torch.nn.Module) -> BaseModelSpec:
    return BaseModelSpec.from_model(tiny_model, TARGETS, max_lora_rank=16)


@pytest.fixture(scope="session")
def peft_adapter_dir(tiny_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT save_pretrained output (r=4 on q_proj, v_proj), random B so it is not a no-op."""
    import copy

    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("peft-adapter")
    model = get_peft_model(copy.deepcopy(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_adapter(out: Path, spec: BaseModelSpec, r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                  seed: int = 0, fill: float | None = None, extra_paths: tuple[str, ...] = (),
                  wrong_in: int | None = None) -> Path:
    """A PEFT-format adapter written directly: every layer path of ``spec`` ending in one of ``targets``."""
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = [p for p in spec.module_shapes if p.rsplit(".", 1)[-1] in targets] + list(extra_paths)
    tensors = {}
    for path in paths:
        in_f, out_f = spec.module_shapes.get(path, (64, 64))
        A = torch.randn(r, wrong_in or in_f, generator=g)
        B = torch.randn(out_f, r, generator=g)
        if fill is not None:
            B[0, 0] = fill
        tensors[f"base_model.model.{path}.lora_A.weight"] = A
        tensors[f"base_model.model.{path}.lora_B.weight"] = B
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "bias": "none"}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture
def make_adapter(tmp_path: Path, base_spec: BaseModelSpec):
    counter = iter(range(10_000))

    def make(**kw: object) -> Path:
        return write_adapter(tmp_path / "src" / f"a{next(counter)}", base_spec, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def store(tmp_path: Path, base_spec: BaseModelSpec) -> AdapterStore:
    return AdapterStore.open(tmp_path / "adapters", base_spec, max_upload_bytes=4 << 20)[0]
