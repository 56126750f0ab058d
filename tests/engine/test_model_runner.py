"""The runner's own attention, rotary embedding and norms give the Hugging Face model's logits, on every model
family it accepts: prefilled prompts of different lengths, then decode steps on the per-row cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine import model_runner
from server.engine.model_runner import ModelRunner
from server.engine.packed_lora import pack_for_cpu

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _model(kind: str, dtype: torch.dtype) -> nn.Module:
    import transformers as tf

    config = {
        "llama": lambda: tf.LlamaConfig(**SIZES),
        "mistral": lambda: tf.MistralConfig(**SIZES, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**SIZES),  # q/k/v carry a bias
        "qwen3": lambda: tf.Qwen3Config(**SIZES, head_dim=16),  # per-head norms of q and k
    }[kind]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    for p in model.parameters():  # random norms and biases, so a skipped or misplaced one shows
        if p.dim() == 1:
            nn.init.normal_(p, mean=1.0 if p.shape[0] in (16, 64) else 0.0, std=0.2)
    return model


def _reference(model: nn.Module, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """HF's logits for the prompt's last token, then after each of ``steps`` appended: (1 + len(steps), V)."""
    ids = torch.tensor([prompt + steps])
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
    return logits[len(prompt) - 1:]


def _runner_logits(runner: ModelRunner, prompts: list[list[int]], steps: list[list[int]]) -> list[torch.Tensor]:
    out = [[lg] for lg in runner.prefill(list(range(len(prompts))), prompts)]
    lens = [len(p) for p in prompts]
    for s in range(len(steps[0])):
        for r, lg in enumerate(runner.decode([st[s] for st in steps], lens)):
            out[r].append(lg)
        lens = [n + 1 for n in lens]
    return [torch.stack(rows) for rows in out]


PROMPTS = [[5, 9, 14, 3, 77, 21, 8], [40, 2, 61], [11] * 12]
STEPS = [[7, 33, 2, 90], [15, 15, 4, 1], [60, 61, 62, 63]]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("longest_plain", [model_runner.MATH_ATTENTION_MAX_T, 0], ids=["products", "fused kernel"])
def test_runner_matches_the_hf_model_in_float32(kind: str, longest_plain: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill attention on plain products (short prompts) and on the fused kernel (long ones) alike."""
    monkeypatch.setattr(model_runner, "MATH_ATTENTION_MAX_T", longest_plain)
    model = _model(kind, torch.float32)
    got = _runner_logits(ModelRunner(model, max_rows=3, max_len=64), PROMPTS, STEPS)
    for prompt, steps, logits in zip(PROMPTS, STEPS, got):
        want = _reference(model, prompt, steps)
        assert torch.allclose(logits, want, atol=1e-4), (kind, (logits - want).abs().max())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_fused_runner_matches_the_plain_one_in_bf16(kind: str) -> None:
    """With q/k/v packed into one product (bf16 on CPU), rotation and attention read views of that product; the
    MLP's products carry its activation, gating and residual add (packed_mlp.py)."""
    model = _model(kind, torch.bfloat16)
    plain = _runner_logits(ModelRunner(model, max_rows=3, max_len=64), PROMPTS, STEPS)
    if pack_for_cpu(model, {}) == (0, 0, 0):
        pytest.skip("no oneDNN bf16 on this CPU")
    assert all(hasattr(layer.self_attn, "fused_qkv") for layer in model.model.layers)
    assert all(layer.mlp.fused_mlp is not None for layer in model.model.layers)
    fused = _runner_logits(ModelRunner(model, max_rows=3, max_len=64), PROMPTS, STEPS)
    for a, b in zip(plain, fused):
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        assert torch.allclose(a, b, atol=0.05), (kind, (a - b).abs().max())
