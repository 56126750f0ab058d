"""TGI's and LoRAX's generation API over HTTP, in the shapes their clients parse (lorax.types, text_generation)."""

from __future__ import annotations

import json

import httpx
import pytest

PROMPT = "Once upon a time"


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60)


def tgi(srv, inputs: str = PROMPT, path: str = "/generate", **parameters) -> dict:
    r = post(srv, path, {"inputs": inputs, "parameters": parameters})
    assert r.status_code == 200, r.text
    return r.json()


def events(srv, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", srv.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data:") for ln in lines)  # no "[DONE]": these clients json-decode every event
    return [json.loads(ln[5:]) for ln in lines]


def openai_text(srv, **body) -> dict:
    r = post(srv, "/v1/completions", {"model": "alpha", "prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_generate_equals_the_openai_path_with_details_and_alternatives(server) -> None:
    want = openai_text(server, max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    out = tgi(server, adapter_id="alpha", max_new_tokens=8, details=True, return_k_alternatives=2, top_n_tokens=2)
    assert out["generated_text"] == want["text"] and out["route"]["adapter"] == "alpha"
    d = out["details"]
    assert (d["finish_reason"], d["generated_tokens"], len(d["tokens"]), d["prefill"]) == ("length", 8, 8, [])
    assert [t["logprob"] for t in d["tokens"]] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-5)
    for t, top in zip(d["tokens"], d["top_tokens"]):
        assert len(t["alternative_tokens"]) == 2 and t["alternative_tokens"][0]["id"] == t["id"]  # greedy: the top
        assert [a["id"] for a in t["alternative_tokens"]] == [a["id"] for a in top]
    assert "details" not in tgi(server, adapter_id="alpha", max_new_tokens=8)
    assert tgi(server, adapter_id="alpha", max_new_tokens=8)["cached"] is True

    full = tgi(server, adapter_id="alpha", max_new_tokens=8, return_full_text=True)["generated_text"]
    assert full == PROMPT + want["text"]
    base = openai_text(server, model=server_base_id(server), max_tokens=5, temperature=0, ignore_eos=True)
    assert tgi(server, max_new_tokens=5)["generated_text"] == base["text"]  # no adapter_id: the base model
    assert tgi(server, adapter_id="alpha", max_new_tokens=5, truncate=2, details=True)["details"]["prompt_tokens"] == 2


def server_base_id(srv) -> str:
    return httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]


def test_sampling_follows_tgi_and_matches_openai_with_the_same_seed(server) -> None:
    sampled = tgi(server, adapter_id="gamma", max_new_tokens=10, do_sample=True, seed=9)["generated_text"]
    assert sampled == openai_text(server, model="gamma", max_tokens=10, temperature=1.0, seed=9,
                                  ignore_eos=True)["text"]
    warped = tgi(server, adapter_id="gamma", max_new_tokens=10, temperature=0.7, top_k=20, seed=9)  # warpers: sample
    assert warped["generated_text"] == openai_text(server, model="gamma", max_tokens=10, temperature=0.7, top_k=20,
                                                   seed=9, ignore_eos=True)["text"]


def test_stream_sends_a_token_per_event_and_ends_with_text_and_details(server) -> None:
    whole = tgi(server, adapter_id="beta", max_new_tokens=12, details=True)
    text = whole["generated_text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    for params in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "stop": [stop]}):
        body = {"inputs": PROMPT, "parameters": {"adapter_id": "beta", **params}}
        for path, extra in (("/generate_stream", {}), ("/", {"stream": True})):
            evs = events(server, path, {**body, **extra})
            last = evs[-1]
            assert all(e["generated_text"] is None and e["details"] is None for e in evs[:-1])
            assert [e["index"] for e in evs] == list(range(1, len(evs) + 1))
            assert "".join(e["token"]["text"] for e in evs) == last["generated_text"]
            assert last["details"]["generated_tokens"] == len(evs)
            if "stop" in params:
                assert (last["generated_text"], last["details"]["finish_reason"]) == (text[:text.find(stop)],
                                                                                    "stop_sequence")
            else:
                assert last["generated_text"] == text and last["details"]["finish_reason"] == "length"
                assert [e["token"]["id"] for e in evs] == [t["id"] for t in whole["details"]["tokens"]]
    listed = post(server, "/", {"inputs": PROMPT, "parameters": {"adapter_id": "beta", "max_new_tokens": 12}})
    assert listed.status_code == 200 and listed.json()[0]["generated_text"] == text


def test_decoder_input_details_score_the_input_as_echo_does(server) -> None:
    d = tgi(server, adapter_id="alpha", max_new_tokens=1, decoder_input_details=True, details=True)["details"]
    echo = openai_text(server, max_tokens=1, temperature=0, echo=True, logprobs=0)["logprobs"]
    n = d["prompt_tokens"]
    assert len(d["prefill"]) == n and d["prefill"][0]["logprob"] is None
    assert [t["logprob"] for t in d["prefill"][1:]] == pytest.approx(echo["token_logprobs"][1:n], abs=1e-5)


@pytest.mark.parametrize("path,body,status,kind,needle", [
    ("/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "nope"}}, 404, "not_found", "alpha"),
    ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}, 422, "validation", "max_new_tokens"),
    ("/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "x/y", "adapter_source": "hub"}}, 422,
     "validation", "/admin/adapters"),
    ("/generate", {"inputs": PROMPT, "parameters": {"watermark": True}}, 422, "validation", "watermark"),
    ("/generate_stream", {"inputs": PROMPT, "parameters": {"decoder_input_details": True}}, 422, "validation",
     "stream=false"),
    ("/", {"inputs": ""}, 422, "validation", "inputs"),
])
def test_errors_take_tgi_shape(server, path: str, body: dict, status: int, kind: str, needle: str) -> None:
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()
    assert isinstance(err["error"], str) and err["error_type"] == kind and needle in err["error"]


def test_info_describes_the_served_model(server) -> None:
    info = httpx.get(server.url + "/info").json()
    assert info["model_id"] == server_base_id(server) and info["max_best_of"] == 1
    assert info["max_total_tokens"] == info["max_input_length"] + 1 and {"alpha", "beta"} <= set(info["adapters"])
    assert httpx.get(server.url + "/v1/nope").json()["error"]["type"] == "not_found_error"  # others keep OpenAI's
