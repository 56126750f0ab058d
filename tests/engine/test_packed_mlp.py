"""The fused MLP (products with the activation, gating and residual as oneDNN post-ops) gives the module's output
plus the residual, and steps aside when a row of the batch has an adapter on the MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from base_model.packed_linear import packable
from server.engine.lora_layers import LoraBatch, SlotLoRALinear, build_lora_batch
from server.engine.packed_lora import pack_for_cpu
from server.engine.packed_mlp import PackedMLP, fuse_mlp

pytestmark = pytest.mark.skipif(not packable(nn.Linear(4, 4).to(torch.bfloat16)),
                                reason="this torch/CPU has no oneDNN bf16 packing")

HIDDEN, INTER = 48, 96


def _mlp(act: str = "silu", seed: int = 0) -> LlamaMLP:
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act=act, num_attention_heads=4,
                                num_key_value_heads=4))
    for p in mlp.parameters():
        p.data = torch.randn_like(p) * 0.2
    return mlp.to(torch.bfloat16).eval()


def _with_gate_adapter(mlp: LlamaMLP) -> tuple[LoraBatch, SlotLoRALinear]:
    """gate_proj wrapped, slot 0 holding a rank-4 update on it; then everything packed and fused."""
    batch = LoraBatch()
    gate = SlotLoRALinear(mlp.gate_proj, pool_rows=8, batch=batch, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    gate.set_slot(0, [0, 1, 2, 3], torch.randn(4, HIDDEN, generator=g), torch.randn(INTER, 4, generator=g), 2.0)
    mlp.gate_proj = gate
    assert pack_for_cpu(mlp, {"gate_proj": gate}) == (3, 0, 1)
    return batch, gate


def _inputs(*lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return (torch.randn(*lead, HIDDEN, generator=g).to(torch.bfloat16),
            torch.randn(*lead, HIDDEN, generator=g).to(torch.bfloat16))


@pytest.mark.parametrize("lead", [(1,), (5,), (2, 7)], ids=["1 row", "5 rows", "2x7 tokens"])
def test_fused_mlp_is_the_residual_plus_the_module(lead: tuple[int, ...]) -> None:
    mlp = _mlp()
    x, res = _inputs(*lead)
    with torch.inference_mode():
        want = (res.float() + mlp(x).float())
        assert pack_for_cpu(mlp, {}) == (3, 0, 1)
        assert isinstance(mlp.fused_mlp, PackedMLP)
        got = mlp.fused_mlp(x, res)
    assert got.shape == res.shape and got.dtype == torch.bfloat16
    err = (got.float() - want).abs().max().item()
    assert err <= 0.02 * want.abs().max().item(), err


def test_a_row_with_an_adapter_on_the_mlp_runs_the_module_with_its_term() -> None:
    mlp = _mlp()
    batch, _ = _with_gate_adapter(mlp)
    x, res = _inputs(2, 3)
    with torch.inference_mode():
        build_lora_batch(batch, [0, -1], [None, None], {0: [0, 1, 2, 3]}, torch.device("cpu"), torch.float32)
        with_adapter = mlp.fused_mlp(x, res)
        assert torch.equal(with_adapter, res + mlp(x))  # the module's own path, LoRA term included
        batch.clear()
        base = mlp.fused_mlp(x, res)
    # the adapter's term shows on its row only: a fused path that ignored it would give the base row's values
    assert (with_adapter[0].float() - base[0].float()).abs().max() > 0.5
    assert torch.allclose(with_adapter[1].float(), base[1].float(), atol=0.05 * base[1].abs().max().item())


def test_an_mlp_with_another_activation_is_not_fused() -> None:
    mlp = _mlp(act="gelu")
    assert pack_for_cpu(mlp, {}) == (3, 0, 0)
    assert fuse_mlp(mlp) is None and mlp.fused_mlp is None
