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
