"""Hot registration over the admin API, driven over HTTP against a real server."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.api.conftest import tiny_env
from tests.engine.peft_helpers import make_peft_adapter
from tests.server_proc import ServerProcess

TOKEN = "test-admin-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def sources(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    good = make_peft_adapter(tiny_llama_dir, root / "good", r=8, seed=31, std=0.3)
    good2 = make_peft_adapter(tiny_llama_dir, root / "good2", r=16, seed=32, std=0.3)
    bad_shape = root / "bad_shape"
    shutil.copytree(good, bad_shape)
    t = load_file(bad_shape / "adapter_model.safetensors")
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key] = t[key][:, :10].contiguous()
    save_file(t, bad_shape / "adapter_model.safetensors")
    pickle_only = root / "pickle_only"
    pickle_only.mkdir()
    shutil.copy(good / "adapter_config.json", pickle_only)
    (pickle_only / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    big_rank = make_peft_adapter(tiny_llama_dir, root / "big_rank", r=32, seed=33)
    return {"good": good, "good2": good2, "bad_shape": bad_shape, "pickle_only": pickle_only, "big_rank": big_rank}


@pytest.fixture(scope="module")
def admin_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("store")
    env = tiny_env(tiny_llama_dir, store, CLORA_ADMIN_TOKEN=TOKEN, CLORA_MAX_UPLOAD_BYTES="2000000")
    log = tmp_path_factory.mktemp("logs") / "admin.log"
    srv = ServerProcess(env, log).start()
    yield srv
    srv.stop()


def zip_dir(src: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in src.iterdir():
            z.write(p, f"adapter/{p.name}")
    return buf.getvalue()


def gen(srv, model: str, prompt: str = "Once upon a time") -> httpx.Response:
    return httpx.post(srv.url + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})


def register_path(srv, name: str, path: Path, **kw) -> httpx.Response:
    return httpx.post(srv.url + "/admin/adapters", headers=AUTH, json={"name": name, "path": str(path), **kw},
                      timeout=60)


def test_admin_disabled_without_token(server) -> None:
    r = httpx.get(server.url + "/admin/adapters")
    assert r.status_code == 403 and "CLORA_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_missing_or_wrong_token_is_401(admin_server) -> None:
    assert httpx.get(admin_server.url + "/admin/adapters").status_code == 401
    r = httpx.get(admin_server.url + "/admin/adapters", headers={"Authorization": "Bearer wrong-token"})
    assert r.status_code == 401


def test_register_serve_version_and_delete(admin_server, sources) -> None:
    srv = admin_server
    r = register_path(srv, "task-a", sources["good"], description="topic classification")
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["name"] == "task-a" and m["version"] == 1 and m["rank"] == 8 and len(m["sha256"]) == 64
    v1 = gen(srv, "task-a").json()
    assert v1["route"]["version"] == 1
    r = register_path(srv, "task-a", sources["good2"])
    assert r.status_code == 201 and r.json()["version"] == 2
    v2 = gen(srv, "task-a").json()
    assert v2["route"]["version"] == 2 and v2["choices"][0]["text"] != v1["choices"][0]["text"]
    assert httpx.get(srv.url + "/admin/adapters/task-a", headers=AUTH).json()["versions"] == [1, 2]
    assert httpx.delete(srv.url + "/admin/adapters/task-a", headers=AUTH).status_code == 204
    assert gen(srv, "task-a").status_code == 404
    assert httpx.delete(srv.url + "/admin/adapters/task-a", headers=AUTH).status_code == 404


def test_multipart_upload_with_examples(admin_server, sources) -> None:
    srv = admin_server
    examples = b'{"prompt": "is this review positive?"}\n{"prompt": "great movie"}\n'
    r = httpx.post(srv.url + "/admin/adapters", headers=AUTH, timeout=60,
                   data={"name": "uploaded", "description": "sentiment"},
                   files={"file": ("a.zip", zip_dir(sources["good"]), "application/zip"),
                          "examples": ("ex.jsonl", examples, "application/jsonl")})
    assert r.status_code == 201, r.text
    assert r.json()["examples"] == ["is this review positive?", "great movie"]
    assert gen(srv, "uploaded").status_code == 200


@pytest.mark.parametrize("case,expect", [
    ("bad_shape", 400), ("pickle_only", 400), ("big_rank", 400), ("bad_name", 400), ("too_big", 413),
    ("not_archive", 400), ("bad_examples", 400),
])
def test_bad_upload_is_4xx_and_old_version_still_serves(admin_server, sources, case: str, expect: int) -> None:
    srv = admin_server
    if gen(srv, "stable").status_code == 404:
        assert register_path(srv, "stable", sources["good"]).status_code == 201
    before = gen(srv, "stable").json()
    if case in ("bad_shape", "pickle_only", "big_rank"):
        r = register_path(srv, "stable", sources[case])
    elif case == "bad_name":
        r = register_path(srv, "../evil", sources["good"])
    elif case == "too_big":
        r = httpx.post(srv.url + "/admin/adapters", headers=AUTH, data={"name": "stable"}, timeout=60,
                       files={"file": ("a.zip", b"0" * 3_000_000, "application/zip")})
    elif case == "not_archive":
        r = httpx.post(srv.url + "/admin/adapters", headers=AUTH, data={"name": "stable"}, timeout=60,
                       files={"file": ("a.zip", b"this is not a zip", "application/zip")})
    else:
        r = httpx.post(srv.url + "/admin/adapters", headers=AUTH, data={"name": "stable"}, timeout=60,
                       files={"file": ("a.zip", zip_dir(sources["good"]), "application/zip"),
                              "examples": ("ex.jsonl", b"not json\n", "application/jsonl")})
    assert r.status_code == expect, r.text
    assert r.json()["error"]["message"]
    after = gen(srv, "stable").json()
    assert after["route"] == before["route"] and after["choices"] == before["choices"]


def test_register_while_32_requests_in_flight(admin_server, sources) -> None:
    srv = admin_server
    assert register_path(srv, "busy", sources["good"]).status_code == 201
    with cf.ThreadPoolExecutor(32) as ex:
        futs = [ex.submit(lambda i=i: httpx.post(srv.url + "/v1/completions", timeout=120, json={
            "model": "busy", "prompt": f"request {i}", "max_tokens": 24, "temperature": 0})) for i in range(32)]
        regs = [register_path(srv, "busy", sources["good2"]), register_path(srv, "other", sources["good"])]
        codes = [f.result().status_code for f in futs]
    assert codes == [200] * 32
    assert [r.status_code for r in regs] == [201, 201]


def test_pin_unpin_and_vllm_aliases(admin_server, sources) -> None:
    srv = admin_server
    r = httpx.post(srv.url + "/v1/load_lora_adapter", headers=AUTH, timeout=60,
                   json={"lora_name": "vl", "lora_path": str(sources["good"])})
    assert r.status_code == 200 and r.json()["version"] >= 1
    p = httpx.post(srv.url + "/admin/adapters/vl/pin", headers=AUTH, timeout=60).json()
    assert p["pinned"] is True and p["resident"]["slot"] is True
    assert httpx.post(srv.url + "/admin/adapters/vl/unpin", headers=AUTH, timeout=60).json()["pinned"] is False
    assert httpx.post(srv.url + "/admin/adapters/nope/pin", headers=AUTH, timeout=60).status_code == 404
    r = httpx.post(srv.url + "/v1/unload_lora_adapter", headers=AUTH, timeout=60, json={"lora_name": "vl"})
    assert r.status_code == 200 and gen(srv, "vl").status_code == 404


def resident_in_slot(srv, name: str, timeout_s: float = 10.0) -> bool:
    """Whether ``name`` sits in a compute slot, waiting up to ``timeout_s`` for the engine to put it there."""
    deadline = time.monotonic() + timeout_s
    while True:
        if httpx.get(srv.url + f"/admin/adapters/{name}", headers=AUTH).json()["resident"]["slot"]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_a_registered_adapter_takes_a_slot_before_its_first_request(admin_server, sources) -> None:
    srv = admin_server
    assert register_path(srv, "staged", sources["good2"]).status_code == 201
    assert resident_in_slot(srv, "staged")  # no request has asked for it yet
    r = gen(srv, "staged")
    assert r.status_code == 200 and r.json()["route"]["adapter"] == "staged"


def test_pins_never_give_way_and_a_pin_with_no_slot_left_is_a_409(tiny_llama_dir: Path, sources,
                                                                  tmp_path: Path) -> None:
    env = tiny_env(tiny_llama_dir, tmp_path / "store", CLORA_ADMIN_TOKEN=TOKEN, CLORA_MAX_LORAS="1")
    with ServerProcess(env, tmp_path / "one-slot.log") as srv:
        assert register_path(srv, "held", sources["good"]).status_code == 201
        assert httpx.post(srv.url + "/admin/adapters/held/pin", headers=AUTH, timeout=60).json()["pinned"]
        assert register_path(srv, "later", sources["good2"]).status_code == 201
        assert not resident_in_slot(srv, "later", timeout_s=0.5)  # not staged over the pinned one

        r = httpx.post(srv.url + "/admin/adapters/later/pin", headers=AUTH, timeout=60)

        assert r.status_code == 409 and "CLORA_MAX_LORAS" in r.json()["error"]["message"]
        assert resident_in_slot(srv, "held", timeout_s=0)
        assert gen(srv, "held").status_code == 200  # the engine goes on


def test_restart_brings_registered_adapters_back(tiny_llama_dir: Path, sources, tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = tiny_env(tiny_llama_dir, store, CLORA_ADMIN_TOKEN=TOKEN)
    with ServerProcess(env, tmp_path / "a.log") as srv:
        assert register_path(srv, "keep", sources["good"]).status_code == 201
        assert register_path(srv, "keep", sources["good2"]).status_code == 201
        before = gen(srv, "keep").json()
    with ServerProcess(env, tmp_path / "b.log") as srv:
        after = gen(srv, "keep").json()
        assert after["route"]["version"] == 2 and after["choices"] == before["choices"]


@pytest.mark.slow
def test_500_register_unregister_cycles_keep_memory_flat(admin_server, sources) -> None:
    srv = admin_server
    for i in range(50):  # warm-up: allocator pools, CPU tier, caches
        register_path(srv, "cycle", sources["good"])
        httpx.delete(srv.url + "/admin/adapters/cycle", headers=AUTH)
    rss0 = srv.rss_bytes()
    for i in range(500):
        assert register_path(srv, "cycle", sources["good" if i % 2 else "good2"]).status_code == 201
        if i % 50 == 0:
            assert gen(srv, "cycle").status_code == 200
        assert httpx.delete(srv.url + "/admin/adapters/cycle", headers=AUTH).status_code == 204
    grown = srv.rss_bytes() - rss0
    assert grown < 50 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 500 cycles"
