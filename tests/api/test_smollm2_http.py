"""The real path: SmolLM2-135M over HTTP, mixed adapters in one batch, each equal to PEFT alone (float32)."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import pytest
import torch

from tests.engine.peft_helpers import make_peft_adapter, peft_alone
from tests.server_proc import TEST_DEVICE, ServerProcess

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "List three colors:",
           "Translate to French: good morning", "2 + 2 =", "The best way to learn Python is"]


@pytest.fixture(scope="module")
def smol_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("smol-adapters")
    make_peft_adapter(smollm2_dir, root / "q8", r=8, seed=21, std=0.02)
    make_peft_adapter(smollm2_dir, root / "all16", r=16, seed=22, std=0.02,
                      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    env = {"CLORA_ADAPTERS_DIR": str(root), "CLORA_DTYPE": "float32", "CLORA_DEVICE": TEST_DEVICE,
           "CLORA_ROUTER": "hint", "CLORA_MAX_BATCH_SIZE": "8", "CLORA_MODEL_CACHE_DIR": str(smollm2_dir.parent)}
    with ServerProcess(env, tmp_path_factory.mktemp("logs") / "smol.log") as srv:
        yield srv, root


def _peft_greedy(smollm2_dir: Path, adapter: Path | None, prompt: str, n: int) -> str:
    tok, model = peft_alone(smollm2_dir, adapter)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_mixed_batch_over_http_equals_peft_alone(smol_server, smollm2_dir: Path) -> None:
    srv, root = smol_server
    base_id = httpx.get(srv.url + "/ready").json()["model"]
    jobs = [(["q8", "all16", base_id][i % 3], p) for i, p in enumerate(PROMPTS)]
    body = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(lambda j: httpx.post(srv.url + "/v1/completions", timeout=120,
                                               json={"model": j[0], "prompt": j[1], **body}).json(), jobs))
    for (model, prompt), r in zip(jobs, got):
        adapter = None if model == base_id else root / model
        assert r["choices"][0]["text"] == _peft_greedy(smollm2_dir, adapter, prompt, 12), (model, prompt)


def test_real_model_answers_sensibly_and_streams(smol_server) -> None:
    srv, _ = smol_server
    base_id = httpx.get(srv.url + "/ready").json()["model"]
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
        "model": base_id, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 20, "temperature": 0}).json()
    assert "Paris" in r["choices"][0]["message"]["content"]


def test_loglikelihood_as_an_evaluation_harness_asks_for_it(smol_server) -> None:
    """echo + logprobs + max_tokens 1, the request lm-eval's completions model sends: the continuation's
    log-likelihood is the sum of its tokens' logprobs after the context's."""
    srv, _ = smol_server
    base_id = httpx.get(srv.url + "/ready").json()["model"]
    context = "The capital of France is"

    def loglikelihood(continuation: str) -> float:
        r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
            "model": base_id, "prompt": context + continuation, "max_tokens": 1, "temperature": 0, "echo": True,
            "logprobs": 1}).json()
        lp = r["choices"][0]["logprobs"]
        start = next(i for i, off in enumerate(lp["text_offset"]) if off >= len(context))
        end = len(lp["tokens"]) - 1  # the last entry is the generated token
        assert "".join(lp["tokens"][:end]) == context + continuation
        return sum(lp["token_logprobs"][start:end])

    assert loglikelihood(" Paris") > loglikelihood(" London") + 2


def test_tgi_stream_and_details_end_on_the_eos_token(smol_server, smollm2_dir: Path) -> None:
    """The real model ends a chat turn with its EOS: TGI lists it as the last (special) token, streamed or not."""
    from transformers import AutoTokenizer

    srv, _ = smol_server
    inputs = AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    body = {"inputs": inputs, "parameters": {"max_new_tokens": 64, "details": True}}
    whole = httpx.post(srv.url + "/generate", json=body, timeout=120).json()
    d = whole["details"]
    assert d["finish_reason"] == "eos_token" and whole["generated_text"].strip(), whole["generated_text"]
    assert d["tokens"][-1]["special"] and not any(t["special"] for t in d["tokens"][:-1])
    assert len(d["tokens"]) == d["generated_tokens"] < 64
    import json

    with httpx.stream("POST", srv.url + "/generate_stream", json=body, timeout=120) as r:
        evs = [json.loads(ln[5:]) for ln in r.iter_lines() if ln.startswith("data:")]
    assert [e["token"]["id"] for e in evs] == [t["id"] for t in d["tokens"]] and evs[-1]["token"]["special"]
    assert "".join(e["token"]["text"] for e in evs) == evs[-1]["generated_text"] == whole["generated_text"]
