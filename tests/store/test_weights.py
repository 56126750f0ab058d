"""Slot forms computed per group of same-shaped modules equal each module's own ``slot_form``, bit for bit."""

from __future__ import annotations

import pytest
import torch

from adapters_store.weights import AdapterWeights, LoraPair, Scratch


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
    assert sorted(p for paths, _, _ in ready for p in paths) == sorted(modules)
    for paths, A, Bs in ready:
        assert A.dtype == Bs.dtype == dtype and A.is_contiguous() and Bs.is_contiguous()
        for path, a, bs in zip(paths, A, Bs, strict=True):
            want_A, want_Bs = modules[path].slot_form(dtype)
            assert torch.equal(a, want_A) and torch.equal(bs, want_Bs), path
    assert w.slot_ready(dtype) is ready  # computed once per dtype


def test_slot_groups_converted_into_scratch_equal_slot_ready() -> None:
    """Converting as the engine writes (into reused scratch memory, one group at a time) gives slot_ready's values,
    also when the scratch grows between adapters and is reused by the next one."""
    g = torch.Generator().manual_seed(1)

    def adapter(r: int) -> AdapterWeights:
        return AdapterWeights("peft_lora", r, {f"model.layers.{i}.{n}": LoraPair(torch.randn(r, 32, generator=g),
                                                                                 torch.randn(o, r, generator=g), 2.0)
                                               for i in range(3) for n, o in (("q", 32), ("k", 16))})

    scratch = Scratch()
    for w in (adapter(4), adapter(16), adapter(8)):
        want = {paths: (A, Bs) for paths, A, Bs in AdapterWeights("peft_lora", w.rank, w.modules).slot_ready(
            torch.bfloat16)}
        got = 0
        for paths, A, Bs in w.slot_groups(torch.bfloat16, scratch):
            assert torch.equal(A, want[paths][0]) and torch.equal(Bs, want[paths][1]), paths
            got += 1
        assert got == len(want) == 2 and w.converted(torch.bfloat16) is None
