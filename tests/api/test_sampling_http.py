"""Sampling over HTTP: seeds whatever the neighbours, stop strings, n choices, penalties and vLLM's extra fields."""

from __future__ import annotations

import concurrent.futures as cf

from tests.api.http_helpers import PROMPTS, complete, post, stream_text


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
