"""Packed bf16 base weights (oneDNN) give the products of the plain layers, with and without adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from adapters_store.kinds import load_adapter_dir
from server.engine.lora_layers import build_lora_batch, wrap_lora_layers
from server.engine.model_runner import ModelRunner
from base_model.packed_linear import PackedLinear, pack_linear, pack_model_linears, packable
from server.engine.lora_kernel import load_kernel
from server.engine.packed_lora import pack_for_cpu
from server.settings import DEFAULT_TARGET_MODULES

from .peft_helpers import fixed_rows, make_peft_adapter

needs_packing = pytest.mark.skipif(not packable(nn.Linear(4, 4).to(torch.bfloat16)),
                                   reason="this torch/CPU has no oneDNN bf16 packing")


def test_float32_and_non_linear_layers_stay_plain() -> None:
    lin = nn.Linear(8, 4)
    assert pack_linear(lin) is lin
    m = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    assert pack_model_linears(m) == 0 and type(m[0]) is nn.Linear


@needs_packing
def test_packed_linear_matches_f_linear_for_every_row_count() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    packed = pack_linear(lin)
    assert isinstance(packed, PackedLinear)
    assert packed.weight.shape == (40, 96) and packed.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        for shape in [(1, 96), (3, 1, 96), (2, 7, 96), (64, 96)]:
            x = torch.randn(shape).to(torch.bfloat16)
            want = nn.functional.linear(x, lin.weight, lin.bias).float()
            got = packed(x)
            assert got.shape == want.shape and got.dtype == torch.bfloat16
            assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2), (shape, (got.float() - want).abs().max())


@needs_packing
def test_tied_weight_is_kept_untied_weight_is_dropped() -> None:
    emb = nn.Embedding(50, 16).to(torch.bfloat16)
    model = nn.ModuleDict({"emb": emb, "head": nn.Linear(16, 50, bias=False).to(torch.bfloat16),
                           "proj": nn.Linear(16, 16, bias=False).to(torch.bfloat16)})
    model["head"].weight = emb.weight  # tied
    assert pack_model_linears(model) == 2
    assert model["head"].weight is emb.weight  # still shared, nothing copied
    assert model["proj"].plain is None and "weight" not in dict(model["proj"].named_parameters())


@needs_packing
def test_mixed_adapter_batch_packed_equals_plain(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The whole runner in bf16: every row of a mixed batch (base + two adapters) packed (fused q/k/v, packed LoRA
    terms on oneDNN, then on the compiled kernel) vs plain layers."""
    from transformers import AutoModelForCausalLM

    adapters = [make_peft_adapter(tiny_llama_dir, tmp_path / "a", r=4, seed=1),
                make_peft_adapter(tiny_llama_dir, tmp_path / "b", r=8, seed=2, targets=tuple(DEFAULT_TARGET_MODULES))]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (6, 9, 4)]
    kernel = load_kernel(tmp_path / "kernels")
    assert kernel is not None
    outs = []
    for pack in (False, True, "kernel"):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
        batch, layers = wrap_lora_layers(model, DEFAULT_TARGET_MODULES, pool_rows=2 * 8)
        if pack:
            n_layers = model.config.num_hidden_layers
            assert pack_for_cpu(model, layers, kernel if pack == "kernel" else None) == (
                len(layers) + 1, n_layers, n_layers)  # + lm_head; q/k/v, MLP fused per layer
            assert all(isinstance(layer.base, PackedLinear) for layer in layers.values())
            assert all(layer.packed_term is not None for layer in layers.values())
        ranks = {}
        for slot, d in enumerate(adapters):
            w = load_adapter_dir(d)
            for path, pair in w.modules.items():
                layers[path].set_slot(slot, fixed_rows({slot: pair.A.shape[0]}, 8)[slot], pair.A, pair.B, pair.scale)
            ranks[slot] = w.rank
        runner = ModelRunner(model, max_rows=3, max_len=64)
        build_lora_batch(batch, [0, -1, 1], [None] * 3, fixed_rows(ranks, 8), runner.device, runner.dtype)
        first = runner.prefill([0, 1, 2], prompts)
        nxt = [int(r.argmax()) for r in first]
        second = runner.decode(nxt, [len(p) for p in prompts])
        outs.append((first, second))
    (p0, d0), (p1, d1), (p2, d2) = outs
    for plain, packed in ((p0, p1), (d0, d1), (p0, p2), (d0, d2)):
        scale = plain.abs().max().item()
        assert (plain - packed).abs().max().item() <= 0.02 * scale
        assert [int(r.argmax()) for r in plain] == [int(r.argmax()) for r in packed]
