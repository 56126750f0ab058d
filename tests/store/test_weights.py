"""Slot forms computed per group of same-shaped modules equal each module's own ``slot_form``, bit for bit."""

from __future__ import annotations

import pytest
import torch

from adapters_store.weights import AdapterWeights, LoraPair


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_ready_equals_slot_form_of_every_module(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (8, 32, 32), "k": (8, 32, 16), "v": (8, 32, 16), "o": (4, 32, 32)}  # (r, in, out)
    modules = {}
    for layer in range(3):
        for name, (r, i, o) in shapes.items():
            B = torch.randn(o, r, generator=g)
            modules[f"model.layers.{layer}.{name}"] = LoraPair(
                torch.randn(r, i, generator=g), B.to(torch.bfloat16) if name == "v" else B, 0.5 + layer + r / 8)
    w = AdapterWeights("peft_lora", 8, modules)
    ready = w.slot_ready(dtype)
    assert ready.keys() == modules.keys()
    for path, pair in modules.items():
        A, Bs = ready[path]
        want_A, want_Bs = pair.slot_form(dtype)
        assert A.dtype == Bs.dtype == dtype and A.is_contiguous() and Bs.is_contiguous()
        assert torch.equal(A, want_A) and torch.equal(Bs, want_Bs), path
    assert w.slot_ready(dtype) is ready  # computed once per dtype
