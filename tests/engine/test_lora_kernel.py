"""The compiled LoRA kernel (lora_kernel.py, lora_term.c): both builds against a float64 reference, its cache, and
the fallback when it cannot be built."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from server.engine.lora_kernel import KernelBatch, KernelWeights, LoraKernel, cpu_has_avx512_bf16, load_kernel
from server.engine.lora_layers import LoraBatch, SlotLoRALinear, build_lora_batch

BUILDS = [pytest.param(False, id="portable"),
          pytest.param(True, id="avx512bf16", marks=pytest.mark.skipif(not cpu_has_avx512_bf16(),
                                                                        reason="this CPU has no AVX512-BF16"))]
IN, OUTS = 72, (40, 8)  # past a multiple of 64 (dot products) and of 32 (the expand): every tail loop runs
ROWS = {0: [7, 2, 11], 1: [0, 9, 4, 5, 13]}  # pool rows of slots 0 (r 3) and 1 (r 5), scattered


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernels")


def _layers(batch: LoraBatch) -> list[SlotLoRALinear]:
    g = torch.Generator().manual_seed(0)
    layers = []
    for out in OUTS:
        layer = SlotLoRALinear(torch.nn.Linear(IN, out).to(torch.bfloat16), pool_rows=16, batch=batch)
        for slot, rows in ROWS.items():
            layer.set_slot(slot, rows, torch.randn(len(rows), IN, generator=g), torch.randn(out, len(rows), generator=g),
                           0.5)
        layers.append(layer)
    return layers


@pytest.mark.parametrize("simd", BUILDS)
@pytest.mark.parametrize("T", [1, 3])
def test_kernel_matches_a_float64_reference(simd: bool, T: int, kernel_dir: Path) -> None:
    kernel = load_kernel(kernel_dir, simd=simd)
    assert kernel is not None and kernel.simd == simd
    batch = LoraBatch()
    layers = _layers(batch)
    gate = torch.tensor([1.0, 0.5, 0.25, 2.0, 0.0])  # per-rank weights of a gated row on slot 1
    slots = [1, -1, 0, 1]
    build_lora_batch(batch, slots, [None, None, None, gate], ROWS, torch.device("cpu"), torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(slots) * T, IN, generator=g).to(torch.bfloat16)
    y = torch.randn(len(slots) * T, sum(OUTS), generator=g).to(torch.bfloat16)
    got = y.clone()
    kernel.add_term(x, got, T, KernelWeights.of(layers), KernelBatch.of(batch))

    want = y.double().clone()
    col = 0
    for layer in layers:
        for m in range(x.shape[0]):
            s = slots[m // T]
            if s < 0:
                continue
            rows = torch.tensor(ROWS[s])
            w = gate.double() if m // T == 3 else torch.ones(len(rows), dtype=torch.float64)
            h = (x[m].double() @ layer.A[rows].double().T) * w
            want[m, col:col + layer.out_features] += h @ layer.Bs[rows].double()
        col += layer.out_features
    base_rows = [m for m in range(x.shape[0]) if slots[m // T] < 0]
    assert torch.equal(got[base_rows], y[base_rows])  # no adapter: untouched, bit for bit
    err = (got.double() - want).abs()
    assert (err <= want.abs() * 2**-8 + 1e-3).all(), err.max()  # one rounding to bf16, float32 sums
    assert not torch.allclose(got.double(), y.double(), atol=0.1)  # the term is there


def test_build_is_cached_per_source_and_flags(kernel_dir: Path) -> None:
    first = load_kernel(kernel_dir, simd=False)
    assert first is not None
    mtime = first.path.stat().st_mtime_ns
    again = load_kernel(kernel_dir, simd=False)
    assert again is not None and again.path == first.path and again.path.stat().st_mtime_ns == mtime
    assert not list(kernel_dir.glob("*.tmp"))


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"], ids=["missing", "failing"])
def test_without_a_working_compiler_the_onednn_term_serves(cc: str, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.engine.lora_kernel"):
        assert load_kernel(tmp_path / "kernels", cc=cc) is None
    assert "oneDNN term serves" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so*"))  # nothing half-built left behind


def test_kernel_rejects_mismatched_shapes(kernel_dir: Path) -> None:
    kernel = load_kernel(kernel_dir, simd=False)
    assert isinstance(kernel, LoraKernel)
    batch = LoraBatch()
    layers = _layers(batch)
    build_lora_batch(batch, [0, 1], [None, None], ROWS, torch.device("cpu"), torch.bfloat16)
    x = torch.zeros(2, IN, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="rows of"):
        kernel.add_term(x, torch.zeros(2, sum(OUTS) + 1, dtype=torch.bfloat16), 1, KernelWeights.of(layers),
                        KernelBatch.of(batch))
    with pytest.raises(AssertionError, match="contiguous bf16"):
        kernel.add_term(x.float(), torch.zeros(2, sum(OUTS), dtype=torch.bfloat16), 1, KernelWeights.of(layers),
                        KernelBatch.of(batch))


def test_a_decode_step_on_the_same_rows_keeps_the_batch_a_change_rebuilds_it() -> None:
    """``build_lora_batch`` on the rows of the step before keeps what was built from them (the kernel's arrays,
    the masks); new rows, a new slot layout or a new gate tensor rebuild them."""
    batch = LoraBatch()
    cpu = torch.device("cpu")
    g1, g2 = torch.tensor([1.0, 0.5, 0.25, 2.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 1.0, 3.0])
    build_lora_batch(batch, [0, 1], [None, g1], ROWS, cpu, torch.bfloat16)
    first = KernelBatch.of(batch)
    build_lora_batch(batch, [0, 1], [None, g1], ROWS, cpu, torch.bfloat16)
    assert KernelBatch.of(batch) is first
    build_lora_batch(batch, [0, 1], [None, g2], ROWS, cpu, torch.bfloat16)
    assert torch.equal(KernelBatch.of(batch).w[1], g2) and torch.equal(first.w[1], g1)
    build_lora_batch(batch, [1, 0], [g2, None], ROWS, cpu, torch.bfloat16)
    assert torch.equal(KernelBatch.of(batch).w[0], g2) and batch.row_pos == [1, 0]
    moved = {0: [1, 3, 6], 1: ROWS[1]}  # slot 0 written elsewhere in the pools
    build_lora_batch(batch, [1, 0], [g2, None], moved, cpu, torch.bfloat16)
    assert KernelBatch.of(batch).tensors[1][0, :3].tolist() == [1, 3, 6]
