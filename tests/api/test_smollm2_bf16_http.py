"""The path a CPU user gets by default: SmolLM2 in bf16 over HTTP, packed for oneDNN, the LoRA term of decode steps
and short prompts in the compiled kernel. bf16 is not bit-exact, so each row of a mixed batch is checked against
float32 PEFT with that adapter alone on its first token's logprob, which the adapters move by far more."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from base_model.packed_linear import packable
from tests.engine.peft_helpers import make_peft_adapter, peft_alone
from tests.server_proc import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not packable(nn.Linear(4, 4).to(torch.bfloat16)),
                                                   reason="this torch/CPU has no oneDNN bf16 packing")]

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "List three colors:", "2 + 2 ="]
TOLERANCE = 0.1  # nats: bf16 against float32 on the first token's logprob (measured: 0.032 at most)


@pytest.fixture(scope="module")
def bf16_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bf16-adapters")
    make_peft_adapter(smollm2_dir, root / "q8", r=8, seed=31, std=0.05)
    make_peft_adapter(smollm2_dir, root / "qkvo16", r=16, seed=32, std=0.05,
                      targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    log = tmp_path_factory.mktemp("logs") / "bf16.log"
    env = {"CLORA_ADAPTERS_DIR": str(root), "CLORA_DTYPE": "bfloat16", "CLORA_DEVICE": "cpu", "CLORA_ROUTER": "hint",
           "CLORA_MAX_BATCH_SIZE": "8", "CLORA_MODEL_CACHE_DIR": str(smollm2_dir.parent), "CLORA_LOG_LEVEL": "info"}
    with ServerProcess(env, log) as srv:
        yield srv, root, log


def _first_token_f32(smollm2_dir: Path, adapter: Path | None, prompt: str) -> tuple[str, float]:
    """Float32 PEFT alone: the greedy first token and its logprob."""
    tok, model = peft_alone(smollm2_dir, adapter)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
    best = int(logp.argmax())
    return tok.decode([best]), float(logp[best])


def test_bf16_mixed_batch_over_http_follows_each_adapter(bf16_server, smollm2_dir: Path) -> None:
    srv, root, log = bf16_server
    assert "LoRA CPU kernel loaded" in log.read_text(), "the default CPU path should run the compiled kernel"
    base_id = httpx.get(srv.url + "/ready").json()["model"]
    jobs = [(model, p) for p in PROMPTS for model in ("q8", "qkvo16", base_id)]
    body = {"max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    with cf.ThreadPoolExecutor(len(jobs)) as ex:  # one mixed batch: 4 prompts x (2 adapters + base)
        got = list(ex.map(lambda j: httpx.post(srv.url + "/v1/completions", timeout=120,
                                               json={"model": j[0], "prompt": j[1], **body}).json(), jobs))
    moved = 0.0
    for (model, prompt), r in zip(jobs, got):
        lp = r["choices"][0]["logprobs"]
        token, want = _first_token_f32(smollm2_dir, None if model == base_id else root / model, prompt)
        assert lp["tokens"][0] == token, (model, prompt, lp["tokens"][0], token)
        assert abs(lp["token_logprobs"][0] - want) <= TOLERANCE, (model, prompt, lp["token_logprobs"][0], want)
        if model != base_id:
            base_token, base_lp = _first_token_f32(smollm2_dir, None, prompt)
            moved = max(moved, abs(want - base_lp) if token == base_token else float("inf"))
    assert moved > 4 * TOLERANCE  # the adapters move the answer well past the tolerance: no silent base fallback
