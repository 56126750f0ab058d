"""Logprobs, echo and prompt logprobs over HTTP (against PEFT), and prompts given as token ids or as a batch."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api.http_helpers import complete, post, stream_text


def _peft_logprobs(model_dir, adapter_dir, prompt: str, n: int, k: int) -> tuple[list[str], list[float], list[dict]]:
    """Greedy tokens of PEFT's model with the adapter, their log-probabilities and the top k of each step."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    tokens, lps, tops = [], [], []
    for step, t in zip(out.logits, out.sequences[0, ids.shape[1]:].tolist()):
        lp = torch.log_softmax(step[0].float(), -1)
        tokens.append(tok.decode([t]))
        lps.append(float(lp[t]))
        vals, idx = torch.topk(lp, k)
        tops.append({tok.decode([i]): v for i, v in zip(idx.tolist(), vals.tolist())})
    return tokens, lps, tops


def test_logprobs_equal_peft_and_stream_cache_and_chat_agree(server, tiny_llama_dir, tiny_adapters) -> None:
    body = {"model": "alpha", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 3}
    got = complete(server, **body)["choices"][0]
    tokens, lps, tops = _peft_logprobs(tiny_llama_dir, tiny_adapters / "alpha", body["prompt"], 6, 3)
    lp = got["logprobs"]
    assert lp["tokens"] == tokens and "".join(tokens) == got["text"]
    assert lp["token_logprobs"] == pytest.approx(lps, abs=1e-4)
    for mine, ref in zip(lp["top_logprobs"], tops):
        assert mine.keys() == ref.keys() and list(mine.values()) == pytest.approx(list(ref.values()), abs=1e-4)
    assert lp["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    cached = complete(server, **body)
    assert cached["cached"] is True and cached["choices"][0]["logprobs"] == lp
    _, chunks = stream_text(server, "/v1/completions", {**body, "stop": ["<never generated>"]})  # a fresh run
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [t for c in streamed for t in c["tokens"]] == tokens
    assert [v for c in streamed for v in c["token_logprobs"]] == pytest.approx(lp["token_logprobs"], abs=1e-6)
    assert [o for c in streamed for o in c["text_offset"]] == lp["text_offset"]
    _, replayed = stream_text(server, "/v1/completions", body)  # a cache hit, replayed as a stream
    assert replayed[0]["cached"] is True
    assert [t for c in replayed if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]] == tokens
    assert "logprobs" in complete(server, "alpha", "Once upon a time", max_tokens=2)["choices"][0]
    assert complete(server, "alpha", "Once upon a time", max_tokens=2)["choices"][0]["logprobs"] is None

    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    kw = {"model": "beta", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0,
          "logprobs": True, "top_logprobs": 2}
    chat = client.chat.completions.create(**kw)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    for c in content:  # greedy: the chosen token is the most likely one
        assert len(c.top_logprobs) == 2 and c.logprob == pytest.approx(c.top_logprobs[0].logprob) and c.logprob <= 0
        assert c.bytes == list(c.token.encode())
    pieces = list(client.chat.completions.create(**kw, stream=True, stop=["<never generated>"]))
    streamed_chat = [e for p in pieces if p.choices and p.choices[0].logprobs for e in p.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed_chat] == [(c.token, round(c.logprob, 5)) for c in content]


def test_echo_gives_the_prompt_and_its_logprobs(server, tiny_llama_dir, tiny_adapters) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "Once upon a time"
    body = {"model": "alpha", "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    plain = complete(server, **body)["choices"][0]["text"]
    echoed = complete(server, **body, echo=True)["choices"][0]
    assert echoed["text"] == prompt + plain and echoed["logprobs"] is None
    assert stream_text(server, "/v1/completions", {**body, "echo": True})[0] == echoed["text"]

    scored = complete(server, **body, echo=True, logprobs=2)["choices"][0]["logprobs"]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok(prompt)["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                                      tiny_adapters / "alpha").eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    want = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    n = len(ids)
    assert scored["tokens"][:n] == [tok.decode([i]) for i in ids]
    assert scored["token_logprobs"][0] is None and scored["top_logprobs"][0] is None
    assert scored["token_logprobs"][1:n] == pytest.approx(want, abs=1e-4)
    assert all(len(t) == 2 for t in scored["top_logprobs"][1:])
    output = complete(server, **body, logprobs=2)["choices"][0]["logprobs"]
    assert scored["tokens"][n:] == output["tokens"]
    assert scored["token_logprobs"][n:] == pytest.approx(output["token_logprobs"], abs=1e-6)
    assert scored["text_offset"] == [sum(len(t) for t in scored["tokens"][:i]) for i in range(len(scored["tokens"]))]
    r = post(server, "/v1/completions", {**body, "echo": True, "logprobs": 1, "stream": True})
    assert r.status_code == 422 and "stream=false" in r.json()["error"]["message"]


def test_vllm_prompt_logprobs_rank_every_prompt_token(server, tiny_llama_dir) -> None:
    from transformers import AutoTokenizer

    text = "Once upon a time there was a"
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(text)["input_ids"]
    body = {"model": "alpha", "prompt": text, "max_tokens": 1, "temperature": 0}
    both = complete(server, **body, echo=True, logprobs=1, prompt_logprobs=3)["choices"][0]
    scores, echo = both["prompt_logprobs"], both["logprobs"]
    assert scores[0] is None and len(scores) == len(ids)
    assert all(len(top) == 1 for top in echo["top_logprobs"][1:len(ids)])  # echo keeps its own k
    for j, entry in enumerate(scores[1:], 1):
        own = entry[str(ids[j])]
        assert own["logprob"] == pytest.approx(echo["token_logprobs"][j], abs=1e-6)
        others = [v for k, v in entry.items() if k != str(ids[j])]
        assert sorted(v["rank"] for v in entry.values())[:3] == [1, 2, 3]  # the token there and the top 3
        assert len(entry) == (3 if own["rank"] <= 3 else 4)
        if own["rank"] <= 3:
            assert own["rank"] == 1 + sum(v["logprob"] > own["logprob"] for v in others)
        else:
            assert all(v["logprob"] > own["logprob"] for v in others)
    alone = complete(server, **body, prompt_logprobs=0)["choices"][0]
    assert alone["logprobs"] is None and [list(e) for e in alone["prompt_logprobs"][1:]] == [[str(i)] for i in ids[1:]]
    chat = post(server, "/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 1, "prompt_logprobs": 1}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    r = post(server, "/v1/completions", {**body, "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 422 and "stream=false" in r.text


def test_a_prompt_of_token_ids_is_the_prompt_those_ids_spell(server, tiny_llama_dir) -> None:
    from transformers import AutoTokenizer

    text = "Once upon a time"
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(text)["input_ids"]
    body = {"model": "alpha", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    want = complete(server, prompt=text, **body)["choices"][0]["text"]
    for prompt in (ids, [ids]):
        got = complete(server, prompt=prompt, **body)
        assert got["choices"][0]["text"] == want and got["usage"]["prompt_tokens"] == len(ids)
    assert complete(server, prompt=ids, echo=True, **body)["choices"][0]["text"] == text + want
    r = post(server, "/v1/completions", {"prompt": [5, 10 ** 9], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "1000000000" in r.text
    for bad in ([], [[]], [[1], []], ["a"] * 65):
        assert post(server, "/v1/completions", {"prompt": bad, **body}).status_code == 422


def test_a_batch_of_prompts_gives_n_choices_each_in_openai_order(server, tiny_llama_dir) -> None:
    from transformers import AutoTokenizer

    body = {"model": "beta", "max_tokens": 6, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    prompts = ["Once upon a time", "A list of fruits:", "def add(a, b):"]
    alone = [[c["text"] for c in complete(server, prompt=p, **body, n=2)["choices"]] for p in prompts]
    lens = [complete(server, prompt=p, **body)["usage"]["prompt_tokens"] for p in prompts]
    batch = complete(server, prompt=prompts, **body, n=2)
    assert [c["index"] for c in batch["choices"]] == list(range(6))
    assert [c["text"] for c in batch["choices"]] == [t for pair in alone for t in pair]  # prompt p, choice i: 2p + i
    assert all(c["route"]["adapter"] == "beta" for c in batch["choices"])
    assert batch["usage"]["prompt_tokens"] == sum(lens) and batch["usage"]["completion_tokens"] == 36

    fresh = {**body, "seed": 11}  # not cached: the streams run side by side
    whole = complete(server, prompt=prompts, **fresh, echo=True)
    pieces, usage = {i: "" for i in range(3)}, None
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "prompt": prompts, **fresh, "seed": 11, "echo": True, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        for ln in r.iter_lines():
            if ln.startswith("data: {"):
                chunk = json.loads(ln[6:])
                for c in chunk["choices"]:
                    pieces[c["index"]] += c["text"]
                usage = chunk.get("usage") or usage
    assert [pieces[i] for i in range(3)] == [c["text"] for c in whole["choices"]]
    assert all(c["text"].startswith(p) for c, p in zip(whole["choices"], prompts))
    assert usage == whole["usage"]

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = [tok(p)["input_ids"] for p in prompts[:2]]
    assert [c["text"] for c in complete(server, prompt=ids, **body)["choices"]] == [a[0] for a in alone[:2]]
    r = post(server, "/v1/completions", {"prompt": prompts * 9, **body, "n": 4})
    assert r.status_code == 422 and "split the request" in r.text


@pytest.mark.parametrize("body", [{"logprobs": 21}, {"logprobs": -1}])
def test_completion_logprobs_out_of_range_is_422(server, body: dict) -> None:
    r = post(server, "/v1/completions", {"model": "alpha", "prompt": "x", **body})
    assert r.status_code == 422 and "logprobs" in r.json()["error"]["message"]


def test_chat_top_logprobs_needs_logprobs(server) -> None:
    r = post(server, "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                                             "top_logprobs": 2})
    assert r.status_code == 422 and "top_logprobs" in r.json()["error"]["message"]
