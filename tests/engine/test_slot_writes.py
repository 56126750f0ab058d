"""Putting an adapter into a compute slot: from weights the CPU tier converted, or converting as it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_store.weights import AdapterWeights, LoraPair
from base_model.loader import load_base_model
from server.engine.build import build_engine
from server.settings import Settings


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converted_and_unconverted_weights_fill_a_slot_alike(tiny_llama_dir: Path, dtype: str) -> None:
    loaded = load_base_model(str(tiny_llama_dir), tiny_llama_dir, "cpu", dtype)
    eng = build_engine(loaded, Settings(max_loras=2).engine, weights_for=lambda key: None,  # type: ignore[arg-type,return-value]
                       max_model_len=64)
    g = torch.Generator().manual_seed(0)

    def weights() -> AdapterWeights:
        g.manual_seed(0)
        return AdapterWeights("peft_lora", 4, {path: LoraPair(torch.randn(4, layer.in_features, generator=g),
                                                              torch.randn(layer.out_features, 4, generator=g), 1.7)
                                               for path, layer in eng.lora_layers.items()})

    fresh, converted = weights(), weights()
    converted.slot_ready(eng.runner.dtype)
    assert fresh.converted(eng.runner.dtype) is None
    with torch.inference_mode():
        a = eng.adapters.write(("fresh", 1), fresh)
        b = eng.adapters.write(("converted", 1), converted)
    assert fresh.converted(eng.runner.dtype) is None  # written straight into the slot, nothing kept
    rows_a, rows_b = eng.slots.rows_of(a), eng.slots.rows_of(b)
    assert rows_a == [0, 1, 2, 3] and rows_b == [4, 5, 6, 7]  # the lowest free rows, one per rank
    for path, layer in eng.lora_layers.items():
        assert a in layer.present and b in layer.present
        assert torch.equal(layer.A[rows_a], layer.A[rows_b]) and torch.equal(layer.Bs[rows_a], layer.Bs[rows_b]), path
        assert layer.A[rows_a].abs().sum() > 0


def test_a_slot_write_lands_in_each_modules_own_rows_and_a_clear_zeroes_them(tiny_llama_dir: Path) -> None:
    """Same-shaped layers share one pool tensor (written with one copy per group): each module's update must land
    in its own layer's rows of the slot, nowhere else, and leaving the slot must zero exactly those rows."""
    loaded = load_base_model(str(tiny_llama_dir), tiny_llama_dir, "cpu", "float32")
    eng = build_engine(loaded, Settings(max_loras=3).engine, weights_for=lambda key: None,  # type: ignore[arg-type,return-value]
                       max_model_len=64)
    pools = {id(layer.shared[0]) for layer in eng.lora_layers.values()}
    assert len(pools) < len(eng.lora_layers)  # q/o, k/v, gate/up share
    g = torch.Generator().manual_seed(1)
    covered = [p for p in eng.lora_layers if p.endswith(("layers.0.self_attn.q_proj", "o_proj", "up_proj"))]
    pairs = {p: LoraPair(torch.randn(4, eng.lora_layers[p].in_features, generator=g),
                         torch.randn(eng.lora_layers[p].out_features, 4, generator=g), 0.5) for p in covered}
    other = AdapterWeights("peft_lora", 8, {p: LoraPair(torch.randn(8, layer.in_features, generator=g),
                                                        torch.randn(layer.out_features, 8, generator=g), 2.0)
                                            for p, layer in eng.lora_layers.items()})
    threads = torch.get_num_threads()
    with torch.inference_mode():
        keep = eng.adapters.write(("other", 1), other)
        before = {p: (layer.A.clone(), layer.Bs.clone()) for p, layer in eng.lora_layers.items()}
        slot = eng.adapters.write(("some", 1), AdapterWeights("peft_lora", 4, pairs))
        rows = eng.slots.rows_of(slot)
        assert not set(rows) & set(eng.slots.rows_of(keep))
        for p, layer in eng.lora_layers.items():
            A, Bs = before[p][0].clone(), before[p][1].clone()
            if p in pairs:
                A[rows], Bs[rows] = pairs[p].slot_form(torch.float32)
            assert torch.equal(layer.A, A) and torch.equal(layer.Bs, Bs), p
            assert (slot in layer.present) == (p in pairs)
        eng.adapters.clear(slot)
        for p, layer in eng.lora_layers.items():
            assert torch.equal(layer.A, before[p][0]) and torch.equal(layer.Bs, before[p][1]), p
            assert slot not in layer.present and keep in layer.present
    assert torch.get_num_threads() == threads  # the engine's threads again after the one-thread copies
