"""The HTTP API driven as a user would: real server process, httpx and the official openai client."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from tests.api.http_helpers import PROMPTS, complete, post, stream_text


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
