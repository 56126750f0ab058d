"""Prompt log-probabilities from the prefill (completions' echo with logprobs) equal the model's own forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine import model_runner
from server.engine.model_runner import ModelRunner


def test_prefill_scores_prompts_in_chunks_as_the_model_does(tiny_llama_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(model_runner, "SCORE_CHUNK", 4)  # 11 positions to score: chunks of 4, 4 and 3
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, max_rows=3, max_len=64)
    prompts = [list(range(20, 32)), list(range(40, 45)), [7]]
    logits, scored = runner.prefill_scored([0, 1, 2], prompts, [2, None, 0])
    assert torch.allclose(logits, runner.prefill([0, 1, 2], prompts), atol=1e-6)
    assert scored[1] is None and scored[2] == []  # not asked for; a one-token prompt has nothing to score
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompts[0]])).logits[0, :-1].float(), -1)
    assert [t.token for t in scored[0]] == prompts[0][1:]
    want = lp.gather(1, torch.tensor(prompts[0][1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor([t.logprob for t in scored[0]]), want, atol=1e-5)
    top = lp.topk(2, dim=-1)
    assert [[i for i, _ in t.top] for t in scored[0]] == top.indices.tolist()
