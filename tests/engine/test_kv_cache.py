"""The per-row KV cache starts small, doubles as rows need it, and shrinks back after long prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from server.engine.model_runner import ModelRunner


def test_cache_grows_by_doubling_keeps_its_rows_and_shrinks_after_long_prompts(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    small = ModelRunner(model, max_rows=2, max_len=512)
    big = ModelRunner(model, max_rows=2, max_len=512, initial_len=512)  # never grows: the reference
    assert small.alloc_len == 64
    prompts = [list(range(5, 45)), list(range(7, 107))]  # 40 and 100 tokens: the second needs 128
    for runner in (small, big):
        runner.prefill([0], prompts[:1])
        runner.prefill([1], prompts[1:])
    assert small.alloc_len == 128
    lens = [len(p) for p in prompts]
    for _ in range(30):  # row 1 crosses 128 on the way: the cache doubles again mid-decode
        want, got = big.decode([3, 4], lens), small.decode([3, 4], lens)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        lens = [n + 1 for n in lens]
    assert small.alloc_len == 256
    small.shrink()
    assert small.alloc_len == 256  # not past 256: kept for the next requests
    small.prefill([0], [list(range(300))])
    assert small.alloc_len == 512
    small.shrink()
    assert small.alloc_len == 64
