"""Packed LoRA terms and fused q/k/v give the plain layers' products, and follow slot and layout changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine.lora_layers import LoraBatch, SlotLoRALinear, build_lora_batch
from base_model.packed_linear import packable
from server.engine import packed_lora
from server.engine.lora_kernel import LoraKernel, load_kernel
from server.engine.packed_lora import PACK_AFTER, FusedQKV, PackedLoraTerm

pytestmark = pytest.mark.skipif(not packable(nn.Linear(4, 4).to(torch.bfloat16)),
                                reason="this torch/CPU has no oneDNN bf16 packing")

IN, OUTS = 48, (48, 16, 16)
ROWS = {0: [9, 3, 4, 12], 1: list(range(5, 9)) + [0, 1, 2, 15]}  # slots' pool rows, scattered as after evictions
RANKS = {s: len(rows) for s, rows in ROWS.items()}
# Every term of these tests on one path: oneDNN's packed calls, float32 BLAS for small terms (SMALL_TERM), or the
# compiled kernel (lora_kernel.py, for terms of few tokens; the per-row prefill path never takes it).
TERM_PATHS = pytest.mark.parametrize("path", ["onednn", "float32", "kernel"])


@pytest.fixture(scope="module")
def lora_kernel(tmp_path_factory: pytest.TempPathFactory) -> LoraKernel:
    kernel = load_kernel(tmp_path_factory.mktemp("kernels"))
    assert kernel is not None, "the LoRA kernel did not build (see the log): is there a C compiler?"
    return kernel


def _term_path(path: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> LoraKernel | None:
    """Route every term to ``path``; the kernel to hand the terms (None but for "kernel")."""
    monkeypatch.setattr(packed_lora, "SMALL_TERM", 10**9 if path == "float32" else 0)
    return request.getfixturevalue("lora_kernel") if path == "kernel" else None


def _projections(batch: LoraBatch, seed: int = 0) -> list[SlotLoRALinear]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for j, out in enumerate(OUTS):
        lin = nn.Linear(IN, out, bias=j != 1).to(torch.bfloat16)  # k without bias, like a mixed checkpoint
        lin.weight.data = (torch.randn(out, IN, generator=g) * 0.1).to(torch.bfloat16)
        if lin.bias is not None:
            lin.bias.data = torch.randn(out, generator=g).to(torch.bfloat16)
        layer = SlotLoRALinear(lin, pool_rows=16, batch=batch, dtype=torch.float32)
        if j != 2:  # v carries no update: its slots stay empty
            for slot, r in RANKS.items():
                _write(layer, slot, r, g)
        layers.append(layer)
    return layers


def _write(layer: SlotLoRALinear, slot: int, r: int, g: torch.Generator) -> None:
    A, B = torch.randn(r, IN, generator=g) * 0.3, torch.randn(layer.out_features, r, generator=g) * 0.3
    layer.set_slot(slot, ROWS[slot], A, B, 2.0)


def _plain(layers: list[SlotLoRALinear], x: torch.Tensor) -> list[torch.Tensor]:
    """The layers' outputs on the float32 masked path (packed_term unset), whatever the batch asks for."""
    batch = layers[0].batch
    per_row, batch.per_row = batch.per_row, False
    try:
        return [layer(x).float() for layer in layers]
    finally:
        batch.per_row = per_row


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g_, w in zip(got, want):
        assert g_.shape == w.shape
        err = (g_.float() - w).abs().max().item()
        assert err <= 0.02 * w.abs().max().item(), err


@TERM_PATHS
@pytest.mark.parametrize(("T", "per_row"), [(1, False), (5, False), (5, True)])
def test_fused_qkv_matches_the_three_plain_layers(T: int, per_row: bool, path: str, monkeypatch: pytest.MonkeyPatch,
                                                  request: pytest.FixtureRequest) -> None:
    kernel = _term_path(path, monkeypatch, request)
    batch = LoraBatch()
    layers = _projections(batch)
    fused = FusedQKV(*layers, kernel=kernel)
    x = torch.randn(4, T, IN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    gate = torch.tensor([0.25, 0.25, 1.0, 1.0])  # a gated row: per-rank weights of slot 0
    build_lora_batch(batch, [0, 0, -1, 1], [None, gate, None, None], ROWS, torch.device("cpu"), torch.float32,
                     per_row=per_row)
    assert batch.per_row == per_row
    with torch.inference_mode():
        _assert_close(list(fused(x)), _plain(layers, x))
        base_only = [nn.functional.linear(x, la.base.weight, la.base.bias).float() for la in layers]
        got = fused(x)
        assert torch.allclose(got[1][2].float(), base_only[1][2], atol=0.05)  # the base row gets no update
        assert not torch.allclose(got[0][0].float(), base_only[0][0], atol=0.05)  # an adapter row does
        assert torch.allclose(got[2][0].float(), base_only[2][0], atol=0.05)  # v carries no update


@TERM_PATHS
@pytest.mark.parametrize("per_row", [False, True], ids=["masked", "per-row"])
def test_packed_term_follows_rewritten_slots_and_new_layouts(per_row: bool, path: str,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             request: pytest.FixtureRequest) -> None:
    kernel = _term_path(path, monkeypatch, request)
    batch = LoraBatch()
    layers = _projections(batch)
    fused = FusedQKV(*layers, kernel=kernel)
    term_q = PackedLoraTerm([layers[0]], kernel)  # the single-layer form o_proj and the MLP use
    x = torch.randn(3, 1, IN, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    seen = []
    with torch.inference_mode():
        for rows in ([0, 1, -1], [1, 1, 1], [0, 1, -1]):
            build_lora_batch(batch, rows, [None] * 3, ROWS, torch.device("cpu"), torch.float32, per_row=per_row)
            assert batch.per_row == per_row
            for _rewrite in range(2):  # same layout, new slot contents: the packed copies must be rebuilt
                want = _plain(layers, x)
                for _step in range(PACK_AFTER + 1):  # plain copies first, then packed ones
                    _assert_close(list(fused(x)), want)
                    _assert_close([term_q(x, layers[0].base(x))], want[:1])
                seen.append(want[0])
                for layer in layers[:2]:
                    for slot, r in RANKS.items():
                        _write(layer, slot, r, g)
    assert not torch.allclose(seen[0], seen[1])  # the rewrite changed the answer, and the packed path followed


def test_a_prefill_between_decode_steps_keeps_the_decode_layouts_copies() -> None:
    batch = LoraBatch()
    term = PackedLoraTerm(_projections(batch)[:1])

    def weights_for(rows: list[int]) -> tuple:
        build_lora_batch(batch, rows, [None] * len(rows), ROWS, torch.device("cpu"), torch.float32)
        return term._weights()

    decode = weights_for([0, 1, -1])
    prefill = weights_for([1])  # new rows' own layout, between two decode steps
    again = weights_for([0, 1, -1])
    assert again[0] is decode[0] and again[1] is decode[1]  # reused, not gathered again
    assert prefill[0].shape[0] == RANKS[1] and decode[0].shape[0] == RANKS[0] + RANKS[1]


def test_the_kernel_takes_terms_of_few_tokens_and_onednn_the_rest(lora_kernel: LoraKernel,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed_lora, "KERNEL_MAX_TOKENS", 8)
    calls = []

    class Counting:
        def add_term(self, x: torch.Tensor, *args: object) -> None:
            calls.append(x.shape[0])
            lora_kernel.add_term(x, *args)  # type: ignore[arg-type]

    batch = LoraBatch()
    layers = _projections(batch)
    fused = FusedQKV(*layers, kernel=Counting())  # type: ignore[arg-type]
    for T, per_row, expect in ((1, False, [4]), (2, True, [8]), (3, False, []), (3, True, [])):
        calls.clear()
        x = torch.randn(4, T, IN, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16)
        build_lora_batch(batch, [0, 1, -1, 1], [None] * 4, ROWS, torch.device("cpu"), torch.float32, per_row=per_row)
        with torch.inference_mode():
            _assert_close(list(fused(x)), _plain(layers, x))
        assert calls == expect, (T, per_row, calls)  # 4 rows x T tokens against at most 8
