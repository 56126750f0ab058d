"""The HTTP API driven as a user would: real server process, httpx and the official openai client."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

PROMPTS = ["The weather today is", "Once upon a time", "In the beginning the", "A list of fruits:",
           "def add(a, b):", "Dear team, please", "Breaking news from", "The answer is"]


def post(srv, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=timeout)


def complete(srv, model: str, prompt: str, **kw) -> dict:
    r = post(srv, "/v1/completions", {"model": model, "prompt": prompt, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def stream_text(srv, path: str, body: dict) -> tuple[str, list[dict]]:
    chunks = []
    with httpx.stream("POST", srv.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        chunks.append(json.loads(ln[6:]))
    text = "".join(c["choices"][0].get("text", "") or c["choices"][0].get("delta", {}).get("content", "") or ""
                   for c in chunks if c.get("choices"))
    return text, chunks


def test_health_ready_models(server) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    ids = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {"alpha", "beta", "gamma"} <= ids and len(ids) == 4
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    card = client.models.retrieve("beta")
    base = httpx.get(server.url + "/ready").json()["model"]
    assert (card.id, card.parent, card.version) == ("beta", base, 1)
    assert client.models.retrieve(base).kind == "base"
    with pytest.raises(NotFoundError, match="alpha"):
        client.models.retrieve("nope")
    from importlib.metadata import version

    assert httpx.get(server.url + "/version").json()["version"] == version("clora-serve")


def test_tokenize_and_detokenize_count_what_generation_counts(server, tiny_llama_dir) -> None:
    from transformers import AutoTokenizer

    text = "Once upon a time there was"
    t = post(server, "/tokenize", {"model": "alpha", "prompt": text, "return_token_strs": True}).json()
    assert t["tokens"] == AutoTokenizer.from_pretrained(tiny_llama_dir)(text)["input_ids"]
    assert t["count"] == len(t["tokens"]) == len(t["token_strs"])
    assert t["max_model_len"] == httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    assert post(server, "/detokenize", {"tokens": t["tokens"]}).json() == {"prompt": text}
    assert complete(server, "alpha", text, max_tokens=1)["usage"]["prompt_tokens"] == t["count"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    chat = post(server, "/v1/chat/completions", {"model": "beta", "messages": messages, "max_tokens": 1}).json()
    assert post(server, "/tokenize", {"messages": messages}).json()["count"] == chat["usage"]["prompt_tokens"]
    r = post(server, "/tokenize", {"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "alpha" in r.json()["error"]["message"]
    assert post(server, "/tokenize", {"prompt": "x", "messages": messages}).status_code == 422
    r = post(server, "/detokenize", {"tokens": [1, 10 ** 8]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_chat_continues_a_prefilled_assistant_message(server, tiny_llama_dir) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "My favourite is"}]
    rendered = AutoTokenizer.from_pretrained(tiny_llama_dir).apply_chat_template(
        messages, continue_final_message=True, tokenize=False)
    assert rendered.endswith("My favourite is")
    body = {"model": "gamma", "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    cont = post(server, "/v1/chat/completions", {**body, "add_generation_prompt": False,
                                                 "continue_final_message": True}).json()
    want = complete(server, "gamma", rendered, max_tokens=6, temperature=0, ignore_eos=True)
    assert cont["choices"][0]["message"]["content"] == want["choices"][0]["text"]
    assert cont["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"] and cont["cached"] is False
    counted = post(server, "/tokenize", {"messages": messages, "continue_final_message": True}).json()["count"]
    assert counted == cont["usage"]["prompt_tokens"]
    fresh = post(server, "/v1/chat/completions", body).json()  # a new assistant turn: another prompt, another key
    assert fresh["cached"] is False and fresh["usage"]["prompt_tokens"] > cont["usage"]["prompt_tokens"]
    for bad in ({"continue_final_message": True}, {"continue_final_message": True, "add_generation_prompt": False,
                                                   "messages": messages[:1]}):
        r = post(server, "/v1/chat/completions", {**body, **bad})
        assert r.status_code == 422 and "continue_final_message" in r.text


def test_openai_client_unchanged(server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    c = client.completions.create(model="alpha", prompt="Hello there", max_tokens=6, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 6 and c.usage.prompt_tokens > 0
    assert c.model_extra["route"] == {"adapter": "alpha", "version": 1, "method": "hint", "confidence": 1.0}
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    pieces = list(client.completions.create(model="alpha", prompt="Hello there", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == c.choices[0].text
    assert pieces[-1].usage.completion_tokens == 6
    chat_pieces = list(client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, stream=True))
    streamed = "".join(p.choices[0].delta.content or "" for p in chat_pieces if p.choices)
    assert streamed == chat.choices[0].message.content


def test_base_model_by_id_and_auto_fallback(server) -> None:
    base_id = httpx.get(server.url + "/ready").json()["model"]
    base = complete(server, base_id, "Hello there", max_tokens=6, temperature=0)
    assert base["route"]["adapter"] == "__base__"
    auto = complete(server, "auto", "Hello there", max_tokens=6, temperature=0)
    assert auto["route"]["method"] == "fallback" and auto["route"]["adapter"] == "__base__"
    assert auto["choices"][0]["text"] == base["choices"][0]["text"]
    alpha = complete(server, "alpha", "Hello there", max_tokens=6, temperature=0)
    assert alpha["choices"][0]["text"] != base["choices"][0]["text"]  # the adapter is really applied


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "nope", "prompt": "x"}),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/generate", {"adapter": "nope", "prompt": "x"}),
    ("/v1/generate", {"task": "nope", "prompt": "x"}),
])
def test_unknown_adapter_is_404_naming_known(server, path: str, body: dict) -> None:
    r = post(server, path, body)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "not_found_error" and "'nope'" in err["message"]
    assert all(n in err["message"] for n in ("alpha", "beta", "gamma"))


def test_prompt_too_long_is_400_with_counts(server) -> None:
    long_prompt = " hello" * 600  # the tiny model's context is 512
    r = post(server, "/v1/completions", {"model": "alpha", "prompt": long_prompt, "max_tokens": 4})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "512" in msg and "600" in msg.replace("604", "600") or "exceeds" in msg
    r = post(server, "/v1/completions", {"model": "alpha", "prompt": " hello" * 500, "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0), ("max_tokens", 0), ("n", 17), ("stop", ["a"] * 9), ("best_of", 2),
    ("top_k", -5), ("seed", -1), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
    ("min_p", 1.5), ("min_tokens", -1), ("logit_bias", {"5": 101}), ("stop_token_ids", [1] * 65),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("response_format", {"type": "json_object"}),
    ("use_beam_search", True),
])
def test_invalid_parameters_are_422_naming_the_field(server, field: str, value: object) -> None:
    r = post(server, "/v1/completions", {"model": "alpha", "prompt": "x", field: value})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and field in err["message"]


def test_malformed_body_is_json_error_without_traceback(server) -> None:
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json() and "Traceback" not in r.text


def test_stream_equals_non_stream(server) -> None:
    for kw in ({"temperature": 0}, {"temperature": 0.9, "seed": 7, "top_p": 0.9, "top_k": 50}):
        whole = complete(server, "gamma", "Once upon a time", max_tokens=12, **kw)["choices"][0]["text"]
        text, chunks = stream_text(server, "/v1/completions",
                                   {"model": "gamma", "prompt": "Once upon a time", "max_tokens": 12, **kw})
        assert text == whole and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_mixed_adapters_concurrently_equal_each_alone(server) -> None:
    models = ["alpha", "beta", "gamma", httpx.get(server.url + "/ready").json()["model"]]
    jobs = [(models[i % 4], PROMPTS[i]) for i in range(8)]
    alone = [complete(server, m, p, max_tokens=10, temperature=0)["choices"][0]["text"] for m, p in jobs]
    with cf.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(lambda j: complete(server, j[0], j[1], max_tokens=10, temperature=0), jobs))
    assert [t["choices"][0]["text"] for t in together] == alone


def test_seed_gives_same_text_whatever_the_neighbours(server) -> None:
    body = {"prompt": "Dear team, please", "max_tokens": 16, "temperature": 1.0, "seed": 1234}
    alone = complete(server, "beta", **body)["choices"][0]["text"]
    with cf.ThreadPoolExecutor(6) as ex:
        noise = [ex.submit(complete, server, "alpha", p, max_tokens=20, temperature=1.0) for p in PROMPTS[:5]]
        again = ex.submit(complete, server, "beta", **body)
        assert again.result()["choices"][0]["text"] == alone
        [f.result() for f in noise]
    other_seed = complete(server, "beta", **{**body, "seed": 99})["choices"][0]["text"]
    assert other_seed != alone


def test_request_joining_mid_decode_equals_alone(server) -> None:
    long_body = {"model": "alpha", "prompt": "Once upon a time", "max_tokens": 120, "temperature": 0,
                 "ignore_eos": True}
    late_body = {"model": "gamma", "prompt": "Breaking news from", "max_tokens": 10, "temperature": 0}
    long_alone = complete(server, **long_body)["choices"][0]["text"]
    late_alone = complete(server, **late_body)["choices"][0]["text"]
    fresh = {"stop": ["<join-test: never generated>"]}  # another cache key: both really run, side by side
    pieces: list[str] = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**long_body, **fresh, "stream": True},
                      timeout=60) as r:
        late = None
        for ln in r.iter_lines():
            if not ln.startswith("data: ") or ln == "data: [DONE]":
                continue
            pieces.append(json.loads(ln[6:])["choices"][0]["text"])
            if len(pieces) == 5:  # the long request is decoding: join it now
                with cf.ThreadPoolExecutor(1) as ex:
                    late = ex.submit(complete, server, **late_body, **fresh).result()
                joined_while = len(pieces)
    assert late is not None and late["cached"] is False
    assert late is not None and late["choices"][0]["text"] == late_alone
    assert "".join(pieces) == long_alone
    assert joined_while < 120  # it really joined while the other was running


def test_stop_strings_cut_the_text(server) -> None:
    text = complete(server, "alpha", "Once upon a time", max_tokens=20, temperature=0)["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = complete(server, "alpha", "Once upon a time", max_tokens=20, temperature=0, stop=[stop])
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[: text.find(stop)]
    streamed, _ = stream_text(server, "/v1/completions", {"model": "alpha", "prompt": "Once upon a time",
                                                          "max_tokens": 20, "temperature": 0, "stop": [stop]})
    assert streamed == cut["choices"][0]["text"]


def test_n_choices_whole_and_streamed(server) -> None:
    body = {"model": "gamma", "prompt": "Dear team, please", "max_tokens": 8, "ignore_eos": True}
    greedy = complete(server, **body, temperature=0, n=3)
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in greedy["choices"]}) == 1
    one = complete(server, **body, temperature=0)
    assert greedy["usage"] == {"prompt_tokens": one["usage"]["prompt_tokens"], "completion_tokens": 24,
                               "total_tokens": one["usage"]["prompt_tokens"] + 24}
    seeded = {**body, "temperature": 1.0, "seed": 5}
    three = [c["text"] for c in complete(server, **seeded, n=3)["choices"]]
    assert three[0] == complete(server, **seeded)["choices"][0]["text"]  # choice i samples with seed + i
    assert three[1] == complete(server, **{**seeded, "seed": 6})["choices"][0]["text"] and len(set(three)) == 3
    pieces: dict[int, str] = {0: "", 1: "", 2: ""}
    finished = set()
    _, chunks = stream_text(server, "/v1/completions", {**seeded, "n": 3, "stop": ["<never generated>"],
                                                        "stream_options": {"include_usage": True}})
    for c in chunks:
        for ch in c["choices"]:
            pieces[ch["index"]] += ch["text"]
            if ch["finish_reason"]:
                finished.add(ch["index"])
    assert [pieces[i] for i in range(3)] == three and finished == {0, 1, 2}
    assert chunks[-1]["usage"]["completion_tokens"] == 24

    from openai import OpenAI

    chat = OpenAI(base_url=server.url + "/v1", api_key="unused").chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0.8, seed=1, n=2)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens <= 8


def test_penalties_steer_the_text_and_key_the_cache(server) -> None:
    body = {"model": "alpha", "prompt": "A list of fruits: apple, banana,", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    plain = complete(server, **body)["choices"][0]["text"]
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.5}):
        first = complete(server, **body, **extra)
        assert first["cached"] is False and first["choices"][0]["text"] != plain, extra
        again = complete(server, **body, **extra)
        assert again["cached"] is True and again["choices"][0]["text"] == first["choices"][0]["text"]
    r = post(server, "/v1/generate", {"prompt": body["prompt"], "adapter": "alpha", "max_tokens": 24,
                                      "temperature": 0, "ignore_eos": True, "frequency_penalty": 2.0})
    assert r.json()["text"] == complete(server, **body, frequency_penalty=2.0)["choices"][0]["text"]


def test_vllm_sampling_fields_over_http(server, tiny_llama_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    apple, eos = tok(" apple", add_special_tokens=False)["input_ids"][0], tok.eos_token_id
    body = {"model": "alpha", "prompt": "A list of fruits:", "max_tokens": 8, "temperature": 0}
    plain = complete(server, **body, ignore_eos=True)["choices"][0]["text"]
    forced = complete(server, **body, logit_bias={str(apple): 100})
    assert forced["cached"] is False and forced["choices"][0]["text"] == tok.decode([apple] * 8) != plain

    # EOS forced at once; min_tokens holds it off for 3 tokens, which are the unbiased greedy ones
    ends = complete(server, **body, logit_bias={str(eos): 100})
    assert (ends["choices"][0]["text"], ends["choices"][0]["finish_reason"], ends["usage"]["completion_tokens"]) \
        == ("", "stop", 1)
    held = complete(server, **body, logit_bias={str(eos): 100}, min_tokens=3)
    assert held["usage"]["completion_tokens"] == 4 and held["choices"][0]["finish_reason"] == "stop"
    assert plain.startswith(held["choices"][0]["text"]) and held["choices"][0]["text"]

    # a stop token id ends the text like EOS, and is not part of it
    stopped = complete(server, **body, logit_bias={str(apple): 100}, stop_token_ids=[apple], min_tokens=2)
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 3
    assert stopped["choices"][0]["stop_reason"] == apple and held["choices"][0]["stop_reason"] is None  # EOS
    assert stopped["choices"][0]["text"] == held["choices"][0]["text"][:len(stopped["choices"][0]["text"])]

    # the stop string kept in the text on request
    stop = plain[len(plain) // 2: len(plain) // 2 + 3]
    kept = complete(server, **body, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert kept["choices"][0]["text"] == plain[: plain.find(stop) + len(stop)]
    cut = complete(server, **body, ignore_eos=True, stop=[stop])
    assert cut["cached"] is False and cut["choices"][0]["text"] == plain[: plain.find(stop)]
    assert kept["choices"][0]["stop_reason"] == cut["choices"][0]["stop_reason"] == stop
    again = complete(server, **body, ignore_eos=True, stop=[stop])
    assert again["cached"] is True and again["choices"][0]["stop_reason"] == stop  # replayed from the cache
    _, chunks = stream_text(server, "/v1/completions", {**body, "ignore_eos": True, "stop": [stop]})
    assert [c["choices"][0]["stop_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == [stop]

    # min_p = 1 keeps only the likeliest token: sampling becomes greedy, whatever the seed
    sampled = {complete(server, **{**body, "temperature": 1.0, "seed": s}, ignore_eos=True, min_p=1.0)
               ["choices"][0]["text"] for s in (1, 2)}
    assert sampled == {plain}

    r = post(server, "/v1/completions", {**body, "min_tokens": 9})
    assert r.status_code == 422 and r.json()["error"]["param"] == "min_tokens" and "max_tokens (8)" in r.text
    for field, value in (("logit_bias", {"1000000": 5}), ("stop_token_ids", [10 ** 7])):
        r = post(server, "/v1/completions", {**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert post(server, "/v1/chat/completions", {**chat, "tools": [], "tool_choice": "none",
                                                 "response_format": {"type": "text"}}).status_code == 200
    r = post(server, "/v1/chat/completions", {**chat, "tool_choice": "required"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "tool_choice"


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


def test_generate_endpoint_shape(server) -> None:
    r = post(server, "/v1/generate", {"prompt": "Hello", "adapter": "beta", "max_tokens": 4, "temperature": 0})
    body = r.json()
    assert set(body) >= {"text", "adapter", "version", "route", "usage", "cached", "timings"}
    assert body["adapter"] == "beta" and body["version"] == 1 and body["usage"]["completion_tokens"] == 4
    t = post(server, "/v1/generate", {"prompt": "Hello", "task": "beta", "max_tokens": 4, "temperature": 0}).json()
    assert t["text"] == body["text"]


@pytest.mark.parametrize("n", [1, 3])
def test_disconnect_frees_the_row(server, n: int) -> None:
    """A client that goes away stops its generation (every choice of it): far fewer tokens are generated than it
    asked for."""
    before = server.metric("clora_generated_tokens_total", {"adapter": "alpha"}, default=0.0)
    body = {"model": "alpha", "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True,
            "temperature": 0, "n": n}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    deadline = time.monotonic() + 10
    while server.metric("clora_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("clora_requests_running") == 0
    time.sleep(0.3)
    generated = server.metric("clora_generated_tokens_total", {"adapter": "alpha"}, default=0.0) - before
    assert generated < 500, f"{generated} tokens generated for a client that left after 7 chunks"  # of 500 n
